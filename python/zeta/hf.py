"""transformers integration (the optional extra ``zeta-attention[hf]``).

- :class:`ZetaConfig`: a ``PretrainedConfig`` for a decoder-only causal LM built from
  ZetaAttention blocks (no position embeddings: order comes from causality and an optional
  short causal convolution, so a model trained on short windows runs on any context length).
- :class:`ZetaForCausalLM`: a ``PreTrainedModel`` + ``GenerationMixin``; ``generate`` (greedy,
  sampling), ``save_pretrained`` / ``from_pretrained`` and the ``Trainer`` work as for any
  transformers causal LM.
- :class:`ZetaCache`: a transformers ``Cache`` holding one :class:`zeta.KVCache` per layer (and
  the convolutions' last inputs); decoding costs O(log N) per token on the CPU.

Written against transformers 5.x (the ``cache`` keyword) and 4.x (``past_key_values``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

_EXTRA = "pip install 'zeta-attention[hf]'"
try:
    import torch
    import torch.nn.functional as F
    import transformers
    from torch import Tensor, nn
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as _e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f"zeta.hf needs transformers and torch, the optional extra 'hf': {_EXTRA} ({_e})"
    ) from _e

try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - transformers < 4.45 mixes it into PreTrainedModel
    GenerationMixin = object  # type: ignore[misc,assignment]

from .cache import KVCache  # noqa: E402
from .nn import (  # noqa: E402
    ZetaAttention,
    _global_hooks,
    _plain,
    load_caches,
    make_caches,
    save_caches,
)

_PretrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
_V5 = int(transformers.__version__.split(".")[0]) >= 5
_OUT_CACHE = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)

__all__ = ["ZetaCache", "ZetaConfig", "ZetaForCausalLM"]

# Calls with at most this many new tokens (decoding) take the layers' lean step.
_LEAN_MAX_TOKENS = 16


class ZetaConfig(_PretrainedConfig):
    """Configuration of :class:`ZetaForCausalLM`.

    Args:
        vocab_size: tokens V.
        hidden_size: model width E.
        num_hidden_layers: blocks L.
        num_attention_heads: query heads H (E % H == 0).
        num_key_value_heads: key/value heads (GQA); None: H.
        key_dim: width of queries/keys per head (1..8).
        topk, chunk, window, n_curves, n_sink, mean_token, bits, gamma_init: ZetaAttention's
            (None: its defaults; a saved config keeps the values it was saved with).
        exact: exact top-k search (the brute-force top-k, in training and through the
            cache; the default); False: the approximate window search. A config saved
            before exact search was the default and without this key loads as exact.
        mlp_ratio: MLP width / E.
        conv_kernel: causal depthwise convolution before each attention (0: none).
        cache_dtype: storage of the cached values ("float32", "float16", "bfloat16").
    """

    model_type = "zeta"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        num_key_value_heads: Optional[int] = None,
        key_dim: int = 3,
        topk: int = 32,
        chunk: int = 64,
        window: Optional[int] = None,
        n_curves: Optional[int] = None,
        n_sink: int = 0,
        mean_token: bool = False,
        bits: Optional[int] = None,
        gamma_init: float = 1.0,
        exact: bool = True,
        mlp_ratio: int = 4,
        conv_kernel: int = 3,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        cache_dtype: str = "float32",
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.key_dim = key_dim
        self.topk = topk
        self.chunk = chunk
        self.window = window
        self.n_curves = n_curves
        self.n_sink = n_sink
        self.mean_token = mean_token
        self.bits = bits
        self.gamma_init = gamma_init
        self.exact = exact
        self.mlp_ratio = mlp_ratio
        self.conv_kernel = conv_kernel
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.cache_dtype = cache_dtype
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def attention_kwargs(self) -> dict:
        """Keyword arguments of each layer's ZetaAttention."""
        return dict(
            key_dim=self.key_dim,
            num_kv_heads=self.num_key_value_heads,
            topk=self.topk,
            gamma_init=self.gamma_init,
            chunk=self.chunk,
            window=self.window,
            n_curves=self.n_curves,
            n_sink=self.n_sink,
            mean_token=self.mean_token,
            bits=self.bits,
            exact=bool(self.exact),
        )


class ShortConv(nn.Module):
    """Causal depthwise convolution over the sequence, with a decode state.

    forward(x (B, N, E), state (B, kernel-1, E) or None) -> (y (B, N, E), new state): the state
    holds the last kernel-1 inputs (zeros before the sequence start, as the parallel padding).
    """

    def __init__(self, embed_dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(embed_dim, embed_dim, kernel, groups=embed_dim)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> tuple:
        b, n, e = x.shape
        if state is None:
            state = x.new_zeros(b, self.kernel - 1, e)
        elif state.dtype != x.dtype:
            state = state.to(x.dtype)
        full = torch.cat([state, x], dim=1)
        conv = self._modules["conv"]
        if n <= 16:
            # Decoding: torch.conv1d costs ~57 us for one token on a CPU (a quarter of a
            # decode step measured on 2 cores); this weighted sum of the window ~5 us.
            w = conv._parameters["weight"][:, 0]  # (E, kernel)
            if n == 1:
                y = (full * w.t()).sum(1, keepdim=True)
            else:
                y = (full.unfold(1, self.kernel, 1) * w).sum(-1)
            bias = conv._parameters["bias"]
            if bias is not None:
                y = y + bias
        else:
            y = conv(full.transpose(1, 2)).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel - 1) :].detach()


class ZetaDecoderLayer(nn.Module):
    """Pre-norm block: [x + conv(norm(x))], x + attn(norm(x)), x + mlp(norm(x)).

    forward(x (B, N, E), kv=None, conv_state=None) -> (x (B, N, E), new conv state or None).
    """

    def __init__(self, config: ZetaConfig):
        super().__init__()
        e, eps = config.hidden_size, config.layer_norm_eps
        self.conv = None
        if config.conv_kernel > 1:
            self.norm0 = nn.LayerNorm(e, eps=eps)
            self.conv = ShortConv(e, config.conv_kernel)
        self.norm1 = nn.LayerNorm(e, eps=eps)
        self.attn = ZetaAttention(e, config.num_attention_heads, **config.attention_kwargs())
        self.norm2 = nn.LayerNorm(e, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(e, config.mlp_ratio * e), nn.GELU(), nn.Linear(config.mlp_ratio * e, e)
        )

    def forward(
        self, x: Tensor, kv: Optional[KVCache] = None, conv_state: Optional[Tensor] = None
    ) -> tuple:
        new_state = None
        if self.conv is not None:
            y, new_state = self.conv(self.norm0(x), conv_state)
            x = x + y
        x = x + self.attn(self.norm1(x), cache=kv)
        return x + self.mlp(self.norm2(x)), new_state

    def _decode_step(self, x: Tensor, kv: KVCache, conv_state: Optional[Tensor]) -> Optional[tuple]:
        """:meth:`forward` through a cache, for inference: the same operations without the
        submodule calls (a decode step of a small model is mostly per-call overhead; the
        modules are read from ``_modules`` / ``_parameters`` directly for the same reason).
        None when a submodule is not the plain one built here or has hooks: run
        :meth:`forward` instead."""
        m = self._modules
        norm1, norm2, mlp, attn = m["norm1"], m["norm2"], m["mlp"], m["attn"]
        conv = m.get("conv")
        if not (
            _plain(norm1, nn.LayerNorm)
            and _plain(norm2, nn.LayerNorm)
            and _plain(mlp, nn.Sequential)
            and _plain(attn, ZetaAttention)
            and (conv is None or (_plain(conv, ShortConv) and _plain(m["norm0"], nn.LayerNorm)))
        ):
            return None
        fc1, act, fc2 = mlp._modules.values() if len(mlp._modules) == 3 else (None,) * 3
        if not (_plain(fc1, nn.Linear) and _plain(act, nn.GELU) and _plain(fc2, nn.Linear)):
            return None
        new_state = None
        if conv is not None:
            y, new_state = conv.forward(_layer_norm(m["norm0"], x), conv_state)
            x = x + y
        o = attn._decode_step(_layer_norm(norm1, x), kv)
        if o is None:
            return None
        x = x + o
        p1, p2 = fc1._parameters, fc2._parameters
        h = F.linear(_layer_norm(norm2, x), p1["weight"], p1["bias"])
        h = F.linear(F.gelu(h, approximate=act.approximate), p2["weight"], p2["bias"])
        return x + h, new_state


def _shape_of(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__


def _layer_norm(m: nn.LayerNorm, x: Tensor) -> Tensor:
    p = m._parameters
    return F.layer_norm(x, m.normalized_shape, p["weight"], p["bias"], m.eps)


class ZetaCache(Cache):
    """A transformers ``Cache`` backed by one :class:`zeta.KVCache` per layer.

    Build it with :meth:`for_model` (or let ``generate`` / ``forward(use_cache=True)`` make
    one); ``save(directory)`` / ``ZetaCache.load(directory)`` keep a prefilled prompt.
    It does not hand out dense keys/values (``update`` raises): ZetaAttention layers read it
    through their KVCache. Beam search and cropping are not supported.
    """

    is_compileable = False

    def __init__(self, kv_caches: Sequence[KVCache], conv_states: Optional[Sequence] = None):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers < 4.56: Cache() takes no layers
            super().__init__()
        if not kv_caches or not all(isinstance(c, KVCache) for c in kv_caches):
            raise TypeError("kv_caches: expected a non-empty list of zeta.KVCache")
        self.kv: List[KVCache] = list(kv_caches)
        self.conv: List[Optional[Tensor]] = (
            list(conv_states) if conv_states is not None else [None] * len(self.kv)
        )
        if len(self.conv) != len(self.kv):
            raise ValueError(
                f"conv_states: {len(self.conv)} states for {len(self.kv)} layers' caches"
            )

    @classmethod
    def for_model(cls, model: nn.Module, *, batch: int = 1, dtype: Optional[str] = None):
        """Empty caches for every ZetaAttention layer of ``model`` (batch B sequences)."""
        if dtype is None:
            dtype = getattr(getattr(model, "config", None), "cache_dtype", "float32")
        return cls(make_caches(model, batch=batch, dtype=dtype))

    # -- the transformers Cache interface ----------------------------------------------
    def __len__(self) -> int:
        return len(self.kv)

    def __repr__(self) -> str:
        return f"ZetaCache(layers={len(self.kv)}, tokens={self.get_seq_length()}, nbytes={self.nbytes})"

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return len(self.kv[layer_idx or 0])

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple:
        return self.get_seq_length(layer_idx) + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.kv[0].batch

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self.kv)

    @property
    def is_linear(self) -> List[bool]:
        return [False] * len(self.kv)

    @property
    def is_dummy(self) -> List[bool]:
        return [False] * len(self.kv)

    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "ZetaCache holds a Z-order index, not dense keys/values: only ZetaAttention layers use it"
        )

    def _unsupported(self, what: str):
        raise NotImplementedError(f"ZetaCache: {what} is not supported (use greedy or sampling)")

    def reorder_cache(self, beam_idx: Any) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, max_length: int) -> None:
        self._unsupported("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0 and repeats != 1:
            self._unsupported("repeating a filled cache (num_return_sequences > 1)")

    def batch_select_indices(self, indices: Any) -> None:
        self._unsupported("batch_select_indices")

    def reset(self) -> None:
        self.kv = [
            KVCache(
                c.num_kv_heads, c.key_dim, c.value_dim, batch=c.batch, dtype=c.dtype, **c.settings
            )
            for c in self.kv
        ]
        self.conv = [None] * len(self.kv)

    # -- zeta extras ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's KV cache and convolution state."""
        conv = sum(s.numel() * s.element_size() for s in self.conv if s is not None)
        return sum(c.nbytes for c in self.kv) + conv

    def save(self, directory: str | os.PathLike) -> None:
        """Write the caches to ``directory`` (layer-<i>.zkv files and conv.pt)."""
        save_caches(self.kv, directory)
        torch.save(self.conv, Path(directory) / "conv.pt")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ZetaCache:
        """Read a cache written by :meth:`save`."""
        kv = load_caches(directory)
        conv_path = Path(directory) / "conv.pt"
        conv = torch.load(conv_path, weights_only=True) if conv_path.exists() else None
        return cls(kv, conv)


class ZetaPreTrainedModel(transformers.PreTrainedModel):
    config_class = ZetaConfig
    base_model_prefix = "zeta"
    _no_split_modules = ["ZetaDecoderLayer"]
    supports_gradient_checkpointing = False


class ZetaForCausalLM(ZetaPreTrainedModel, GenerationMixin):
    """A decoder-only causal LM of ZetaAttention blocks.

    forward(input_ids (B, N) int64 | inputs_embeds (B, N, E), cache=None, labels=None,
    use_cache=None) -> CausalLMOutputWithPast(loss, logits (B, N, V), cache).

    With a cache (a :class:`ZetaCache`), ``input_ids`` are the next N tokens after those
    cached. Without one, ``use_cache`` makes one when no gradient is recorded (inference);
    training runs the parallel (differentiable) forward. Padding in ``attention_mask`` is not
    supported (zeta attention has no key mask).
    """

    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config: ZetaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            ZetaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def make_cache(self, batch: int = 1) -> ZetaCache:
        """An empty :class:`ZetaCache` for ``batch`` sequences."""
        return ZetaCache.for_model(self, batch=batch, dtype=self.config.cache_dtype)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ):
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3:
            raise ValueError(f"input_ids: expected (B, N), got shape {tuple(x.shape[:-1])}")
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and not bool(attention_mask.all())
        ):
            raise ValueError(
                "attention_mask: padding (zeros) is not supported by ZetaForCausalLM; "
                "batch sequences of equal length or generate one sequence at a time"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, ZetaCache):
            if cache.get_seq_length() != 0:
                raise TypeError(
                    f"cache: a filled {type(cache).__name__} cannot serve ZetaAttention layers; "
                    "pass a ZetaCache (model.make_cache())"
                )
            cache = None  # an empty default cache made by generate(): use ours instead
            use_cache = True
        if cache is None and use_cache and labels is None and not torch.is_grad_enabled():
            cache = self.make_cache(batch=x.shape[0])
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache: {len(cache)} layers, the model has {len(self.layers)}")
        x = self._layers(x, cache)
        h = self.norm(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUT_CACHE: cache})

    def _layers(self, x: Tensor, cache: Optional[ZetaCache]) -> Tensor:
        """The decoder layers over x (B, N, E), through ``cache`` when given. Decoding a
        few tokens without autograd takes each layer's lean step (the same operations
        without submodule calls) unless something is hooked."""
        if cache is None:
            for layer in self.layers:
                x, _ = layer(x)
            return x
        lean = (
            x.shape[1] <= _LEAN_MAX_TOKENS and not torch.is_grad_enabled() and not _global_hooks()
        )
        for i, layer in enumerate(self._modules["layers"]._modules.values()):
            out = None
            if lean and _plain(layer, ZetaDecoderLayer):
                out = layer._decode_step(x, cache.kv[i], cache.conv[i])
            if out is None:
                out = layer(x, cache.kv[i], cache.conv[i])
            x, cache.conv[i] = out
        return x

    def decode(self, input_ids: Tensor, cache: ZetaCache) -> Tensor:
        """The next-token logits of ``input_ids`` (B, T) after the tokens in ``cache``,
        appending them to it: ``forward(input_ids, cache=cache).logits`` for a decode loop,
        without autograd and without building a ``ModelOutput`` (~20 us, a tenth of a
        one-token step of a small model). Returns (B, T, vocab_size)."""
        if not isinstance(cache, ZetaCache):
            raise TypeError(
                f"cache: expected a ZetaCache (model.make_cache()), got {type(cache).__name__}"
            )
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected a (B, T) tensor of token ids, got {_shape_of(input_ids)}"
            )
        if len(cache) != len(self.layers):
            raise ValueError(f"cache: {len(cache)} layers, the model has {len(self.layers)}")
        with torch.no_grad():
            x = self._layers(self.embed_tokens(input_ids), cache)
            return self.lm_head(self.norm(x))

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> dict:
        """The tokens not yet in the cache (all of them at the first step)."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if past >= input_ids.shape[1] and input_ids.shape[1] > 0:
            raise ValueError(
                f"cache: holds {past} tokens but input_ids has {input_ids.shape[1]}; prefill "
                "all but the last prompt token, then generate from the whole prompt"
            )
        out: dict = {"attention_mask": attention_mask, "use_cache": kwargs.get("use_cache")}
        if inputs_embeds is not None and past == 0:
            out["inputs_embeds"] = inputs_embeds
        else:
            out["input_ids"] = input_ids[:, past:]
        if cache is not None:
            out[_OUT_CACHE] = cache
        return out
