"""Score generated images: FID, KID and IS (FID Inception), LPIPS (against the reference image of the same
name) and HPS v2.1 (against each image's caption). Weights are local files given by flags; a score
without its weights is skipped with one line. Prints a table and writes JSON.

    python metrics.py --generated output/run/validation_images/epoch_00010 --reference data/ \
        --metrics fid,kid,is,lpips,hps --paired_reference_only \
        --metrics_inception_weights weights/weights-inception-2015-12-05-6726825d.pth \
        --metrics_lpips_backbone weights/alexnet-owt-7be5be79.pth \
        --metrics_hps_checkpoint weights/HPS_v2.1_compressed.pt

Lower is better for FID, KID and LPIPS; higher is better for IS and HPS.
"""

from __future__ import annotations

import sys

from sdxl_trainer.evaluation import folder_metrics


def main(argv: list[str] | None = None) -> int:
    return folder_metrics.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
