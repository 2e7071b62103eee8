"""Checkpoints: tiny generated ones, and (later) conversion of original-layout ones to the native layout."""
