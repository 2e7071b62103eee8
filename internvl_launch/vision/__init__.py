"""Image and video inputs exactly as InternVL was trained on them."""
