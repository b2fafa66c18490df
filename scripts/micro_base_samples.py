"""Render the README's grid of base samples of `--model micro`: classes x contexts, one seed each.

    python scripts/micro_base_samples.py            # writes docs/micro-base-samples.png

It samples as `sparse-db sample` does (the pipeline from `load_pipeline`, DPM-Solver++ order 2,
30 steps, guidance 7.5, one generator per image seeded with the image's seed), without an adapter.
"""

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sparse_dreambooth.model import MICRO_MODEL, evaluation_scheduler, load_pipeline
from sparse_dreambooth.sample import EVALUATION_SEEDS

REPOSITORY = Path(__file__).resolve().parents[1]
CLASSES = ("dog", "cat", "teapot", "backpack", "vase", "boot")
CONTEXTS = (
    "on the beach",
    "in the snow",
    "in the jungle",
    "with a city in the background",
    "on top of pink fabric",
    "with a blue house in the background",
)
CELL, LABEL_WIDTH, HEADER = 128, 84, 34


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPOSITORY / "docs" / "micro-base-samples.png")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEEDS[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(MICRO_MODEL)
    pipe.scheduler = evaluation_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    grid = Image.new("RGB", (LABEL_WIDTH + CELL * len(CONTEXTS), HEADER + CELL * len(CLASSES)), "white")
    draw = ImageDraw.Draw(grid)
    for column, context in enumerate(CONTEXTS):
        words = context.split()
        lines = [" ".join(words[: len(words) // 2 + 1]), " ".join(words[len(words) // 2 + 1 :])]
        for line_index, line in enumerate(lines):
            draw.text((LABEL_WIDTH + column * CELL + 4, 4 + 13 * line_index), line, fill="black")
    for row, class_name in enumerate(CLASSES):
        draw.text((4, HEADER + row * CELL + CELL // 2 - 6), f"a photo of a\n{class_name}", fill="black")
        prompts = [f"a photo of a {class_name} {context}" for context in CONTEXTS]
        images = pipe(
            prompt=prompts,
            generator=[torch.Generator().manual_seed(args.seed) for _ in prompts],
            num_inference_steps=30,
            guidance_scale=7.5,
            height=64,
            width=64,
        ).images
        for column, image in enumerate(images):
            grid.paste(
                image.resize((CELL, CELL), Image.Resampling.NEAREST), (LABEL_WIDTH + column * CELL, HEADER + row * CELL)
            )
        print(f"{class_name}: {len(images)} samples", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output, format="PNG", optimize=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
