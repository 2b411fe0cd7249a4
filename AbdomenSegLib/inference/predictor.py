"""The one way in to a loaded model: `get_segmenter(model, device, quality)`.

It picks what runs a card — one network (segmenter.Segmenter), an ensemble (ensemble.EnsembleSegmenter) or a
first stage and its fine second stage (cascade.CascadeSegmenter), all with the same `segment(...)` — builds the
members of the composite ones, and keeps everything loaded, keyed by (model, device), so re-running is fast.
"""

from __future__ import annotations

from AbdomenSegLib.core.options import Device, LogCallback, Quality
from AbdomenSegLib.inference.cascade import CascadeSegmenter
from AbdomenSegLib.inference.ensemble import EnsembleSegmenter
from AbdomenSegLib.inference.segmenter import Segmenter, resolve_device
from AbdomenSegLib.models.card import ModelCard
from AbdomenSegLib.models.cascade_card import cascade_stages
from AbdomenSegLib.models.packages import find_model

_CACHE: dict = {}


def get_segmenter(
    model=None, device: Device = "auto", log: LogCallback = print, quality: Quality = "standard"
) -> Segmenter:
    """Segmenters stay loaded, keyed by (model, device), so re-running a model is fast. An ensemble's card gets
    an ensemble.EnsembleSegmenter (same interface), whose members are cached here too. A second-stage card, or
    quality "high", gets a cascade.CascadeSegmenter (same interface; its stages found and checked first)."""
    card = model if isinstance(model, ModelCard) else find_model(model)
    stages = cascade_stages(card, quality)  # a cascade that cannot run is refused before any network loads
    resolved = resolve_device(device, log)
    key = (str(card.path), resolved) if stages is None else tuple(str(c.path) for c in stages) + (resolved,)
    if key not in _CACHE:
        if stages is not None:
            first, second = stages
            _CACHE[key] = CascadeSegmenter(get_segmenter(first, resolved, log), second, log=log)
        elif card.members:
            # members cached here too, so a member run alone is loaded once
            members = [get_segmenter(m, resolved, log) for m in card.members]
            _CACHE[key] = EnsembleSegmenter(card, members, log=log)
        else:
            _CACHE[key] = Segmenter(card, resolved, log=log)
    return _CACHE[key]
