#!/usr/bin/env python
"""Convert a classification student to detectron2 backbone weights (for MODEL.WEIGHTS).

    tools/convert_student_to_d2.py output/toy/cls_R18_NST/model_final.pth r18_nst_d2.pth
    tools/convert_student_to_d2.py pretrained/torchvision/resnet18-f37072fd.pth r18_tv_d2.pth

The input is a ClassificationTrainer checkpoint or a torchvision-style state dict (ResNet or
nst_det Inception-BN). The output loads into detectron2's R-18/34/50/101 C4 and FPN models
(RESNETS.STRIDE_IN_1X1 False) or nst_det's Inception-BN backbones. Keys not converted are printed.
"""

import argparse
import sys

from nst_det.checkpoint.weights_file import WeightsFileError
from nst_det.modeling.convert import classifier_file_to_d2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="student checkpoint or torchvision-style state dict")
    parser.add_argument("output", help="detectron2 weights file to write (.pth)")
    parser.add_argument("--family", choices=["resnet", "inception_bn", "torchvision"],
                        default=None, help="network family (default: detected from the keys; "
                        "torchvision: keys kept as they are, for nst_det's TorchvisionBackbone)")
    parser.add_argument("--arch", default=None,
                        help="torchvision family (implied): the model name (e.g. "
                        "mobilenet_v3_large), to check the weights strictly against its backbone")
    args = parser.parse_args()

    try:
        done = classifier_file_to_d2(args.input, args.output, args.family, args.arch,
                                     what="student checkpoint")
    except (ValueError, KeyError, WeightsFileError) as e:  # named errors: no traceback
        sys.exit(f"convert_student_to_d2: {e}")
    print(f"{args.input} ({done['family']}): converted {done['converted']} tensors -> "
          f"{args.output}")
    print(f"not converted ({len(done['not_converted'])}):")
    for key, reason in done["not_converted"].items():
        print(f"  {key}: {reason}")


if __name__ == "__main__":
    main()
