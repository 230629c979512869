"""`VisionArch`: a ViT CLIP image tower's shapes and activation, as frozen data.

What every other step of loading passes around: `pool.arch.infer` reads one off the weights,
`pool.arch.names` from open_clip's config for a name, `pool.arch.build` builds the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["VisionArch"]

_SHAPE_FIELDS = ("image_size", "patch_size", "width", "layers", "mlp_ratio", "embed_dim")


@dataclass(frozen=True)
class VisionArch:
    """A ViT CLIP image tower plus the shapes of the text pieces an ImageEncoder keeps.

    `infer_arch` reads one off the weights, `arch_for_name` from open_clip's config for a name;
    `build_clip` builds the model. Frozen and hashable.

    Attributes:
        image_size: input resolution in pixels (square images).
        patch_size: side of a patch in pixels.
        width: the vision transformer's width.
        layers: the vision transformer's block count.
        heads: attention heads per block.
        mlp_ratio: each block's MLP hidden size over ``width``.
        embed_dim: the size of the image embedding (the columns of ``visual.proj``).
        quick_gelu: True for QuickGELU, False for GELU, None when not known (yet).
        text_context_length: rows of the kept ``positional_embedding`` (default 77).
        text_vocab_size: rows of the kept ``token_embedding`` (default 49408).
        text_width: width of the kept text pieces (``ln_final``, ``token_embedding``; default 512).

    Example:
        >>> from pool.arch import arch_for_name
        >>> arch = arch_for_name("ViT-B-32")
        >>> arch.patch_size, arch.width, arch.layers, arch.embed_dim, arch.quick_gelu
        (32, 768, 12, 512, True)
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    embed_dim: int
    quick_gelu: bool | None = None
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_width: int = 512

    def describe(self) -> str:
        """One line for people: patch, width, layers, resolution, embedding and activation.

        Returns:
            The description; the activation is left out when ``quick_gelu`` is None.

        Example:
            >>> from pool.arch import arch_for_name
            >>> arch_for_name("ViT-B-32").describe()
            'patch 32, width 768, 12 layers, 224 px, embed 512, QuickGELU'
        """
        act = {True: ", QuickGELU", False: ", GELU", None: ""}[self.quick_gelu]
        return (f"patch {self.patch_size}, width {self.width}, {self.layers} layers, "
                f"{self.image_size} px, embed {self.embed_dim}{act}")

    def shapes(self) -> tuple[Any, ...]:
        """The shapes that decide whether weights fit (what `check_arch` and `name_for_arch` compare).

        Returns:
            ``(image_size, patch_size, width, layers, mlp_ratio, embed_dim)``: no head count,
            activation or text sizes.
        """
        return tuple(getattr(self, f) for f in _SHAPE_FIELDS)

    def vision_cfg(self) -> dict[str, Any]:
        """open_clip's ``vision_cfg`` for this tower.

        Returns:
            ``image_size``, ``patch_size``, ``width``, ``layers``, ``head_width`` (``width``
            over ``heads``) and ``mlp_ratio``.
        """
        return {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
                "layers": self.layers, "head_width": self.width // max(1, self.heads),
                "mlp_ratio": self.mlp_ratio}

    def text_cfg(self) -> dict[str, Any]:
        """open_clip's ``text_cfg`` for the kept text pieces, with a single transformer block.

        Returns:
            ``context_length``, ``vocab_size``, ``width``, ``heads`` (``width`` / 64) and
            ``layers`` (1: the text transformer is deleted right after construction).
        """
        # The text transformer is deleted right after construction; one block keeps it cheap.
        return {"context_length": self.text_context_length, "vocab_size": self.text_vocab_size,
                "width": self.text_width, "heads": max(1, self.text_width // 64), "layers": 1}

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (``inspect --json`` reports it).

        Returns:
            A new dict, ``dataclasses.asdict`` of the architecture.
        """
        return asdict(self)
