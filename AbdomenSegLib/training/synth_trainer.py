"""Training a contrast-agnostic MR model (SynthSeg-style): the Trainer with tissue-map data and synthesis.

A config with `train.trainer: "synth"` runs this trainer. Its data are `data.sources` (synth_data.py): CT cases
whose tissue maps are painted into a new random-contrast image at every draw, and MR cases whose real image is
shown with probability 1 - `train.synth.prob` (else painted too). Validation runs on the real images of
`data.val_source`'s split (split as that dataset's own model splits it, with `data.val_count` and `data.seed`),
through the card's inferer like every other model, so the card's validation is a real-image figure.
"""

from __future__ import annotations

import numpy as np

from AbdomenSegLib.training.trainer import Trainer


class _LabelLookup:
    """The label as a NumPy integer array (MONAI's spatial transforms hand back float tensors), through `lut`
    when given: our organ numbers (tissue classes already 0) -> the network's channels."""

    def __init__(self, lut: np.ndarray | None = None, key: str = "label"):
        self.lut, self.key = lut, key

    def __call__(self, data):
        d = dict(data)
        label = np.rint(np.asarray(d[self.key])).astype(np.int64)
        d[self.key] = label if self.lut is None else self.lut[label].astype(np.int64)
        return d


class SynthTrainer(Trainer):
    def _load_data(self):
        from AbdomenSegLib.core.channels import organs_to_channels
        from AbdomenSegLib.preprocessing.datasets import split_cases
        from AbdomenSegLib.training.synth import to_target
        from AbdomenSegLib.training.synth_data import build_synth_cache

        d, m = self.config["data"], self.config["model"]
        cases = build_synth_cache(
            d["sources"],
            d["cache"].format(name=self.config["name"]),
            spacing=m["spacing"],
            intensity=m["intensity"],
            orientation=m["orientation"],
            perirenal=d["perirenal"],
            log=self.log,
        )
        prefix = f"{d['val_source']}/"
        _, val = split_cases(
            [n[len(prefix) :] for n in cases if n.startswith(prefix)], d["val_count"], d["seed"], d["fold"]
        )
        self.val_names = [prefix + n for n in val]
        self.train_names = [n for n in cases if n not in self.val_names]
        lut = organs_to_channels(self.labels)
        self.tissue = {n: tissue for n, (_, tissue, _) in cases.items()}
        self.kind = {n: kind for n, (_, _, kind) in cases.items()}
        # (image, channel labels) as the base trainer's validation, crops and loss weights read them; CT cases
        # keep no image (never shown): zeros of the right shape.
        self.cases = {
            n: (image if image is not None else np.zeros_like(tissue), lut[to_target(tissue)])
            for n, (image, tissue, _) in cases.items()
        }
        kinds = {k: sum(1 for n in self.train_names if self.kind[n] == k) for k in set(self.kind.values())}
        self.log(f"train {len(self.train_names)} cases {kinds}, validation (real images) {self.val_names}")

    def build_transforms(self):
        """The standard crops and spatial augmentation (training/recipe.py) on image and tissue map together, then
        the synthesis (a new image from the tissue map; tissue classes -> background), the organs as channels,
        and the standard intensity augmentation on whatever image came out. No CT-only augmentations."""
        from monai import transforms as T

        from AbdomenSegLib.core.channels import organs_to_channels
        from AbdomenSegLib.core.organs import ORGANS
        from AbdomenSegLib.training.recipe import intensity_augmentations, sampling_and_spatial
        from AbdomenSegLib.training.synth import SlabTransform, SynthParams, SynthTransform

        t, m = self.config["train"], self.config["model"]
        synthesis = [
            _LabelLookup(),
            SynthTransform(
                spacing=m["spacing"][::-1],
                prob=t["synth"]["prob"],
                params=SynthParams(
                    ink_prob=t["synth"]["ink_prob"],
                    dark_prob=t["synth"]["dark_prob"],
                    min_contrast=t["synth"]["min_contrast"],
                    perirenal_as_fat=t["synth"]["perirenal_as_fat"],
                ),
            ),
            _LabelLookup(organs_to_channels(self.labels)),
        ]
        slab = [SlabTransform(prob=t["synth"]["slab_prob"])] if t["synth"].get("slab_prob") else []
        # The spatial part sees the tissue map: organs in our organ numbering, not channels.
        organ_values = {o.name: o.label for o in ORGANS}
        return T.Compose(
            sampling_and_spatial(self.config, organ_values) + synthesis + intensity_augmentations(t["augment"]) + slab
        )

    def item(self, name) -> dict:
        from AbdomenSegLib.preprocessing.datasets import decode_image

        image, _ = self.cases[name]
        return {
            "image": decode_image(image)[None],
            "label": self.tissue[name][None].astype(np.int64),
            "label_cls_indices": self._indices(name),
            "synth_only": self.kind[name] == "ct",
        }
