"""Default limits on media input, in one light module (no imports) so that
command-line flags can show them without loading the imaging stack."""

#: Largest image file or data URL accepted.
MAX_IMAGE_BYTES = 32 * 2**20
#: Largest video file accepted.
MAX_VIDEO_BYTES = 512 * 2**20
#: Most frames sampled from a video into one prompt (each frame is 256 tokens).
MAX_VIDEO_FRAMES = 64
#: Most frames a video file may hold: bounds the decode pass (two hours at 30 fps).
MAX_FRAMES_IN_FILE = 216_000
#: Largest frame, in pixels.
MAX_FRAME_PIXELS = 4096 * 4096
