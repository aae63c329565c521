"""The text side of the classifier: prompt templates and :class:`TextClassifier`.

A class name becomes the mean of its prompts' embeddings (``TEMPLATES``: ``seg``, eight
prompts common in CLIP-based segmentation, or ``single``), L2-normalised, from CLIP's text
tower or a sentence-transformers model (:mod:`.encoders`). Embeddings are cached per class
list, and every name that reached the text encoder is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sazs.datasets.zeroshot import prompt_name

from .encoders import TINY_ARCHS, encode_sentences, sentence_dim

TEMPLATES = {
    "single": ("a photo of a {}.",),
    # Prompts common in CLIP-based segmentation (object in a scene, varied size and quality).
    "seg": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a cropped photo of a {}.",
        "a close-up photo of a {}.",
        "a bad photo of a {}.",
        "there is a {} in the scene.",
    ),
}


class TextClassifier:
    """Text embeddings (C, D), L2-normalised, of class names averaged over prompt templates.

    Owns the text encoder: CLIP's text tower (``clip``, kept on the CPU between uses) or a
    sentence-transformers model (``sentence``, on the CPU). Results are cached per class
    list; :attr:`encoded_names` lists every name ever encoded (what reached the text encoder).
    """

    def __init__(
        self,
        clip: nn.Module | None = None,
        arch: str = "ViT-B-16",
        templates: str = "seg",
        device: torch.device | str = "cpu",
        *,
        sentence=None,
    ):
        if templates not in TEMPLATES:
            raise ValueError(f"unknown templates {templates!r}; choose from {sorted(TEMPLATES)}")
        if (clip is None) == (sentence is None):
            raise ValueError("a text classifier needs exactly one text encoder: a CLIP model or a sentence model")
        self.clip, self.tokenizer, self.sentence = None, None, sentence
        if clip is not None:
            import open_clip

            self.clip = clip.eval().requires_grad_(False)
            self.tokenizer = open_clip.get_tokenizer(arch if arch not in TINY_ARCHS else "ViT-B-16")
        self.templates = TEMPLATES[templates]
        self.device = torch.device(device)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.encoded_names: list[str] = []

    @property
    def dim(self) -> int:
        """Dimension of the text space."""
        if self.sentence is not None:
            return sentence_dim(self.sentence)
        proj = self.clip.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, D) float32 unit embeddings of ``prompts``."""
        if self.sentence is not None:
            return encode_sentences(self.sentence, prompts)
        self.clip.to(self.device)
        try:
            chunks = [
                self.clip.encode_text(self.tokenizer(prompts[i : i + 256]).to(self.device), normalize=True)
                for i in range(0, len(prompts), 256)
            ]
        finally:
            self.clip.to("cpu")
        return torch.cat(chunks).float()

    @torch.no_grad()
    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._cache:
            prompts = [t.format(prompt_name(n)) for n in key for t in self.templates]
            emb = self._encode(prompts).reshape(len(key), len(self.templates), -1).mean(1)
            self._cache[key] = F.normalize(emb, dim=-1).cpu()
            self.encoded_names.extend(key)
        return self._cache[key]
