"""Trainer flags of the masked loss (issue 17): per-element loss weights from the masks the caching step stored
(`<stem>.mask.png` beside an image, or its alpha channel with the caching flag --alpha_mask)."""

from __future__ import annotations

import argparse

# Issue 15's resume check reads this: a resumed run with another loss would not continue the same run.
RESUME_RULES = {"masked_loss": "must_match"}


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("masked loss (masks cached by sdxl_process_data_dir.py)")
    g.add_argument(
        "--masked_loss",
        action="store_true",
        help="weight each latent element's loss by the item's cached mask (white 1, black 0; items without a "
        "mask weigh 1 everywhere); the cache must hold masks (default: off, plain MSE)",
    )


def check_args(args: argparse.Namespace) -> None:
    """Nothing to check before the cache is open: `check_cache_has_masks` runs at setup, on the data."""


def check_cache_has_masks(masked_loss: bool, items_with_mask: int, num_items: int) -> None:
    """--masked_loss on a cache without any mask would silently train plain MSE: refuse, saying how to add them."""
    if masked_loss and items_with_mask == 0:
        raise ValueError(
            f"--masked_loss: none of the {num_items} cached items has a mask. Put <stem>.mask.png beside an image "
            "(white = trained, black = ignored) or re-cache images with transparency using --alpha_mask, then re-run "
            "sdxl_process_data_dir.py"
        )
