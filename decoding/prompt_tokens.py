"""PPD prompt tokens: k trained input embeddings, each with n ensemble copies (EPT) whose logits are averaged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class PromptTokensMeta:
    base_model_id: str
    base_model_hash: str  # content hash of the base model's weights: an artifact only fits that model
    k: int  # number of prompt tokens
    n: int  # ensemble copies per prompt token
    extra: dict = field(default_factory=dict)  # training provenance, acceptance table, ...

    def to_json_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict) -> PromptTokensMeta:
        missing = {"base_model_id", "base_model_hash", "k", "n"} - set(data)
        if missing:
            raise ValueError(f"prompt-token metadata lacks {sorted(missing)}")
        return cls(base_model_id=str(data["base_model_id"]), base_model_hash=str(data["base_model_hash"]),
                   k=int(data["k"]), n=int(data["n"]), extra=dict(data.get("extra") or {}))


class PromptTokens(nn.Module):
    """The only trainable part of PPD: ``embeddings`` [k, n, H]."""

    def __init__(self, embeddings: torch.Tensor, meta: PromptTokensMeta):
        super().__init__()
        if embeddings.dim() != 3:
            raise ValueError(f"prompt-token embeddings must be [k, n, hidden], got {tuple(embeddings.shape)}")
        k, n, _ = embeddings.shape
        if (k, n) != (meta.k, meta.n):
            raise ValueError(f"embeddings are [{k}, {n}, H] but the metadata says k={meta.k}, n={meta.n}")
        self.embeddings = nn.Parameter(embeddings)
        self.meta = meta

    @property
    def k(self) -> int:
        return self.meta.k

    @property
    def n(self) -> int:
        return self.meta.n

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[-1]

    def flat(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[k * n, H], indexed by ``token * n + copy`` (the tree buffers' ``prompt_index``)."""
        flat = self.embeddings.reshape(-1, self.hidden_size)
        return flat if dtype is None else flat.to(dtype)

    @classmethod
    def from_token_embeddings(cls, model: nn.Module, k: int = 3, n: int = 1, *, base_model_id: str,
                              base_model_hash: str, generator: torch.Generator | None = None,
                              noise_std: float = 0.01) -> PromptTokens:
        """Untrained start: every prompt token is the mean input embedding; ensemble copies past the first get
        small noise (from ``generator``) so they differ. Training moves them from here."""
        table = model.get_input_embeddings().weight.detach().float()  # type: ignore[operator]  # [V, H]
        mean = table.mean(0)  # [H]
        emb = mean.expand(k, n, -1).clone()  # [k, n, H]
        if n > 1:
            noise = torch.randn(k, n, mean.numel(), generator=generator) * noise_std * table.std()
            emb[:, 1:] += noise[:, 1:]
        meta = PromptTokensMeta(base_model_id=base_model_id, base_model_hash=base_model_hash, k=k, n=n,
                                extra={"init": "mean_token_embedding"})
        return cls(emb.to(table.device), meta)
