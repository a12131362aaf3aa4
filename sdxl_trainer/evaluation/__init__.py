"""Stage 3: sample grids, validation images and scores (FID, KID, IS, LPIPS, HPS), in training and alone."""
