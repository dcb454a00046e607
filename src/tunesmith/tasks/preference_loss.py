"""Preference losses on sequence log-probabilities, one value per pair (or per unpaired answer).

Inputs are summed log-probabilities of each answer's tokens under the model being trained
(`policy_*`) and the frozen starting model (`ref_*`), and the answers' token counts (`n_*`).

- dpo (Rafailov et al. 2023): -log sigmoid(beta * ((pc - rc) - (pr - rr))); `label_smoothing`
  e gives the conservative form (1 - e) * that + e * -log sigmoid(-...), as TRL's `sigmoid`.
- ipo (Azar et al. 2024): ((pc - rc) - (pr - rr) - 1 / (2 beta))^2 on log-probabilities averaged
  over each answer's tokens (TRL's `ipo` averages them too).
- simpo (Meng et al. 2024), no reference: -log sigmoid(beta * (avg pc - avg pr) - gamma).
- orpo (Hong et al. 2024), no reference: the chosen answer's mean token NLL plus beta times
  -log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with p the answer's
  mean token probability; TRL's ORPOTrainer calls the weight `beta` too.
- kto (Ethayarajh et al. 2024), unpaired: with r = p - ref and z0 = max(0, mean r of mismatched
  prompt/answer pairs) held fixed (no gradient), a good answer costs
  desirable_weight * (1 - sigmoid(beta (r - z0))), a bad one undesirable_weight * (1 - sigmoid(beta (z0 - r))).

Each returns (losses per row, rewards per row): for pairs the rewards are (chosen, rejected),
the quantities whose difference is the implicit reward margin the loss pushes apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_FREE = {"simpo", "orpo"}
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


def dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
        label_smoothing: float = 0.0) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    h = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, (chosen.detach(), rejected.detach())


def ipo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
        beta: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    chosen, rejected = (pc - rc) / nc, (pr - rr) / nr
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return loss, (beta * chosen.detach(), beta * rejected.detach())


def simpo(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, beta: float,
          gamma: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    chosen, rejected = beta * pc / nc, beta * pr / nr
    loss = -F.logsigmoid(chosen - rejected - gamma)
    return loss, (chosen.detach(), rejected.detach())


def orpo(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
         beta: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    ac, ar = pc / nc, pr / nr  # mean token log-probabilities (< 0)
    log_odds = (ac - torch.log1p(-torch.exp(ac).clamp(max=1 - 1e-6))) - (ar - torch.log1p(-torch.exp(ar).clamp(max=1 - 1e-6)))
    loss = -ac - beta * F.logsigmoid(log_odds)  # the chosen answer's mean NLL + the odds-ratio term
    return loss, (beta * ac.detach(), beta * ar.detach())


def kto(p: torch.Tensor, r: torch.Tensor, good: torch.Tensor, kl_p: torch.Tensor, kl_r: torch.Tensor, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, rewards beta * (p - r), z0): `good` is a bool tensor; kl_* are log-probabilities of mismatched pairs."""
    z0 = (kl_p - kl_r).mean().clamp(min=0).detach()
    reward = p - r
    loss = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (reward - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward))))
    return loss, beta * reward.detach(), z0


def pair_loss(name: str, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None,
              nc: torch.Tensor, nr: torch.Tensor, beta: float, gamma: float = 0.5,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The paired loss by name (dpo, ipo, simpo, orpo), per pair."""
    if name == "dpo":
        return dpo(pc, pr, rc, rr, beta, label_smoothing)
    if name == "ipo":
        return ipo(pc, pr, rc, rr, nc, nr, beta)
    if name == "simpo":
        return simpo(pc, pr, nc, nr, beta, gamma)
    if name == "orpo":
        return orpo(pc, pr, nc, nr, beta)
    raise ValueError(f"unknown paired preference loss {name}")


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] row by row, `chunk` rows at a time, in float32; the backward pass
    recomputes each chunk's logits instead of keeping them (rows x vocabulary floats never live at once)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor,
                chunk: int) -> torch.Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk):
                logits = F.linear(h[i : i + chunk].float(), weight.float(), None if bias is None else bias.float())
                lse[i : i + chunk] = torch.logsumexp(logits, -1)
                out[i : i + chunk] = logits.gather(1, tgt[i : i + chunk, None])[:, 0] - lse[i : i + chunk]
        ctx.save_for_backward(h, weight, bias, tgt, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, bias, tgt, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        w = weight.float()
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], ctx.chunk):
                hc, g = h[i : i + ctx.chunk].float(), grad[i : i + ctx.chunk].float()
                logits = F.linear(hc, w, None if bias is None else bias.float())
                # d logp[t] / d logits = onehot(t) - softmax(logits)
                dlogits = torch.exp(logits - lse[i : i + ctx.chunk, None]).mul_(-g[:, None])
                dlogits[torch.arange(len(hc), device=h.device), tgt[i : i + ctx.chunk]] += g
                if need_h:
                    gh[i : i + ctx.chunk] = dlogits @ w
                if need_w:
                    gw.addmm_(dlogits.t(), hc)
                if need_b:
                    gb += dlogits.sum(0)
        return (None if gh is None else gh.to(h.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), None, None)


def token_logps(h: torch.Tensor, head: torch.nn.Module, tgt: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Log-probability of each target token from the hidden states that predict it, through a linear output
    layer (`head`: weight, optional bias), without holding rows x vocabulary logits: the memory of a step is
    the backbone's, however long the answers."""
    return _ChunkedTokenLogps.apply(h, head.weight, getattr(head, "bias", None), tgt, chunk)
