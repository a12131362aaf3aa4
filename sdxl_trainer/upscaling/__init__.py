"""Real-ESRGAN-family upscaling and GFPGAN face restoration through spandrel, for caching and `upscale.py`."""
