"""Configuration of BERT with a head count and an FFN width per layer.

transformers v5 dropped ``pruned_heads`` and ``BertConfig`` carries a single head count and a
single FFN width.  Structured pruning (EarlyBERT, physical shrink) needs both per layer, so this
config adds two optional lists on top of ``BertConfig``.  Everything else -- field names, defaults,
JSON layout -- stays that of ``BertConfig`` so a uniform config converts losslessly to a stock one.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BertConfig


@strict
class DistSparseBertConfig(BertConfig):
    """``BertConfig`` plus per-layer attention head counts and FFN widths.

    ``layer_num_heads[i]`` is the number of attention heads kept in layer ``i`` and
    ``layer_intermediate_sizes[i]`` the number of FFN neurons kept there; ``None`` means every
    layer has ``num_attention_heads`` heads / ``intermediate_size`` neurons.

    The head dimension is always ``hidden_size // num_attention_heads`` with the ORIGINAL head
    count: pruning removes whole heads, it never narrows one, so a layer with ``h`` heads has
    Q/K/V projections of ``h * head_dim`` output features.
    """

    model_type = "dist_sparse_bert"

    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    # DynaBERT's rewiring (dist_sparse.dynabert): every layer's heads and FFN neurons were sorted
    # by importance and dealt round-robin over this many tensor-parallel shards, so the unit at
    # position p has importance rank dynabert.subnet.position_rank(p); None: never rewired.
    unit_order_tp: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Raise a plain ValueError here: the strict-dataclass class validators would otherwise
        # report the same problem wrapped in a StrictDataclassClassValidationError, which is not
        # a ValueError and reads worse to a user who typed a bad list.
        self.validate_layer_sizes()

    # Named validate_* so that huggingface_hub's @strict also runs it on save_pretrained(),
    # catching lists that were edited after construction (e.g. by a physical shrink).
    def validate_layer_sizes(self) -> None:
        """Check that the per-layer lists fit the model; raise ``ValueError`` if not."""
        if self.num_attention_heads < 1:
            raise ValueError(f"num_attention_heads must be >= 1, got {self.num_attention_heads}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): the head dimension is hidden_size // num_attention_heads"
            )
        for name in ("layer_num_heads", "layer_intermediate_sizes"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if len(sizes) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(sizes)} entries but num_hidden_layers is {self.num_hidden_layers}"
                )
            # bool is an int subclass; True as a head count is certainly a mistake.
            bad = [(i, s) for i, s in enumerate(sizes) if isinstance(s, bool) or not isinstance(s, int) or s < 1]
            if bad:
                # A layer without any head (or FFN neuron) would need a different module
                # structure (no Q/K/V at all), which HF names and AutoTP cannot express.
                raise ValueError(
                    f"{name} entries must be integers >= 1 (a layer cannot lose all its heads or "
                    f"FFN neurons); bad (layer, value) pairs: {bad}"
                )

        tp = self.unit_order_tp
        if tp is not None:
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise ValueError(f"unit_order_tp must be an integer >= 1 or None, got {tp!r}")
            if not self.is_uniform():
                raise ValueError("unit_order_tp (DynaBERT's rewiring) needs every layer at full size")
            if self.num_attention_heads % tp or self.intermediate_size % tp:
                raise ValueError(f"unit_order_tp {tp} does not divide {self.num_attention_heads} heads and "
                                 f"{self.intermediate_size} FFN neurons")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, fixed by the original (unpruned) head count."""
        return self.hidden_size // self.num_attention_heads

    def heads_of(self, layer: int) -> int:
        """Number of attention heads in ``layer``."""
        self._check_layer(layer)
        if self.layer_num_heads is None:
            return self.num_attention_heads
        return self.layer_num_heads[layer]

    def intermediate_of(self, layer: int) -> int:
        """Number of FFN neurons (``intermediate.dense`` output features) in ``layer``."""
        self._check_layer(layer)
        if self.layer_intermediate_sizes is None:
            return self.intermediate_size
        return self.layer_intermediate_sizes[layer]

    def is_uniform(self) -> bool:
        """True when every layer has the full head count and FFN width, i.e. stock BERT shapes."""
        return all(
            self.heads_of(i) == self.num_attention_heads and self.intermediate_of(i) == self.intermediate_size
            for i in range(self.num_hidden_layers)
        )

    def to_hf_bert_config(self) -> BertConfig:
        """A plain ``BertConfig`` with the same fields; only possible when :meth:`is_uniform`.

        A pruned model has to be exported dense-equivalent (removed heads as zeros) or with its
        own modeling code; a stock ``BertConfig`` cannot describe per-layer sizes.
        """
        if not self.is_uniform():
            raise ValueError(
                "to_hf_bert_config() needs uniform layers; this config has per-layer sizes "
                f"layer_num_heads={self.layer_num_heads}, layer_intermediate_sizes={self.layer_intermediate_sizes}. "
                "Pad removed heads/neurons back with zeros to export a stock BertConfig."
            )
        data = self.to_dict()
        for key in ("layer_num_heads", "layer_intermediate_sizes", "unit_order_tp", "model_type", "architectures",
                    "auto_map"):
            data.pop(key, None)
        return BertConfig(**data)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_hidden_layers} layers")


__all__ = ["DistSparseBertConfig"]
