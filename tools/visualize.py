"""Pictures as PNG files: `python tools/visualize.py <picture> [options]`.

    predictions  --checkpoint CKPT [--config X.yaml] [--num-images 4] [--score-threshold 0.3] --out DIR
    attention    --checkpoint CKPT --image IMG [--query Q] [--layer -1] [--level 0] [--head H] --out PNG
                 (DETR: decoder cross-attention of one query over the image)
    sampling     --checkpoint CKPT --image IMG [--query Q] [--layer -1] [--level 0|all] --out PNG
                 (Deformable DETR: sampling points of one query)
    clusters     --checkpoint CKPT --image IMG [--layer 0] [--head 0] [--level 0] --out PNG
                 (ACT: the encoder's query clusters over the image)
    curves       --run runs/NAME (or a metrics.csv) --out PNG   (loss and AP of a run)

The query defaults to the highest-scoring one. Runs on CUDA when available (`--device auto`).
`--print-config` prints the resolved `--config` (with `--set` overrides) and exits.
`--set model.KEY=VALUE` overrides reach the checkpoint's model (e.g. `--set model.encoder.attention=act`
to show ACT clusters of a plain model).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_common_arguments, add_print_config_argument, print_config, run_tool

PICTURES = ("predictions", "attention", "sampling", "clusters", "curves")


def _level(text: str) -> int | None:
    return None if text == "all" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="visualize.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("picture", choices=PICTURES, nargs="?")
    parser.add_argument("--out", help="PNG file (predictions: a folder); required")
    parser.add_argument("--checkpoint", help="model checkpoint (all but curves)")
    parser.add_argument("--config", help="predictions: dataset config (default: the checkpoint's)")
    parser.add_argument("--image", help="attention, sampling, clusters: the image file")
    parser.add_argument("--run", help="curves: a run folder (trainer.output_dir) or its metrics.csv")
    parser.add_argument("--num-images", type=int, default=4, help="predictions: validation images to draw")
    parser.add_argument("--score-threshold", type=float, help="predictions: lowest score drawn (default 0.3)")
    parser.add_argument("--query", type=int, help="query index (default: the highest-scoring)")
    parser.add_argument("--layer", type=int, help="decoder layer (-1: last); clusters: encoder layer")
    parser.add_argument("--level", type=_level, default=0, help="feature level; sampling also takes 'all'")
    parser.add_argument("--head", type=int, help="attention head (attention: default the mean of heads)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not args.print_config and (args.picture is None or args.out is None):
        parser.error("give a picture and --out (or --print-config --config X.yaml)")
    return args


def _need(args: argparse.Namespace, *names: str) -> None:
    from detr_lab.engine.cli import ToolError

    for name in names:
        if getattr(args, name) is None:
            raise ToolError(f"'{args.picture}' needs --{name.replace('_', '-')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        if args.picture == "curves":
            from detr_lab.visualize.curves import plot_run_curves

            _need(args, "run")
            print(plot_run_curves(args.run, args.out))
            return
        from detr_lab.predict import Predictor
        from detr_lab.predict.pictures import validation_predictions
        from detr_lab.visualize import attention

        _need(args, "checkpoint")
        if args.picture == "predictions":
            threshold = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
            for path in validation_predictions(args.checkpoint, args.out, config=args.config,
                                               overrides=args.overrides, num_images=args.num_images,
                                               device=args.device, **threshold):
                print(path)
            return
        _need(args, "image")
        # Not optimized: the hooks of detr_lab.visualize.capture must see the attention modules as built.
        predictor = Predictor.from_checkpoint(args.checkpoint, overrides=args.overrides, device=args.device,
                                              optimize=False)
        image = predictor.preprocess(args.image)
        augment = predictor.config.data.augment
        common = {"mean": augment.mean, "std": augment.std}
        decoder_layer = -1 if args.layer is None else args.layer
        if args.picture == "attention":
            if args.level is None:
                raise ValueError("attention: --level must be a level index")
            path = attention.cross_attention_picture(
                predictor.model, image, args.out, query=args.query, layer=decoder_layer, level=args.level,
                head=args.head, **common)
        elif args.picture == "sampling":
            path = attention.sampling_points_picture(
                predictor.model, image, args.out, query=args.query, layer=decoder_layer, level=args.level,
                **common)
        else:
            if args.level is None:
                raise ValueError("clusters: --level must be a level index")
            path = attention.clusters_picture(
                predictor.model, image, args.out, layer=0 if args.layer is None else args.layer,
                head=0 if args.head is None else args.head, level=args.level, **common)
        print(path)

    return run_tool("visualize.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
