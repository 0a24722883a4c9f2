"""Knowledge edits for the EDIT scenario: ROME's rank-one update of one MLP output projection.

The paper's third scenario edits Llama-2-chat with ROME (Meng et al. 2022) on one NoIntentEdit instance
(paper §4, paper-notes.md §1 and §6) and shows the edit erodes safety. ROME, as its reference code runs it:

1. **Key** k* (Meng et al. §3.1, Eq. 3): the input of layer L's MLP output projection W at the subject's last
   token, averaged over the prompt preceded by a few context prefixes (ROME samples ten from the model; sa_lens
   uses fixed :data:`CONTEXTS`, so an edit is reproducible).
2. **Value** v* (§3.1, Eq. 4): W's output at that token plus a vector δ optimised with Adam so the model continues
   each prefixed prompt with the target: mean NLL of the target tokens + ``kl_factor`` · KL of the next-token
   distribution on ``"{subject} is a"`` (keeps the subject's other properties) + ``weight_decay``·‖δ‖/‖v‖², with
   ‖δ‖ clamped to ``clamp_norm_factor``·‖v‖.
3. **Update** (§3.1, Eq. 2): ΔW = (v* − W k₀)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k₀), C = E[k kᵀ] over ordinary text
   (:mod:`sa_lens.edit_stats`, cached), k₀ the key on the bare prompt. Several requests are applied one after the
   other (sequential ROME), each on the model as the previous ones left it.

:func:`knowledge_edit` applies edits for a ``with`` block and writes the original weights back bit for bit on exit,
also after an exception; :func:`apply_edits` keeps them (to build an edited checkpoint, :func:`save_edited`).
Every request is checked (subject in prompt, layer, architecture) before anything is computed, and an edit that
does not reach ``max_loss`` raises :class:`~sa_lens.errors.ConvergenceError` with the loss reached; in every
error case the model is left exactly as it was. :func:`edit_scores` measures efficacy, generalisation and
specificity as CounterFact does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from sa_lens.bridge import checkpoint_tokenizer, is_bridge
from sa_lens.edit_requests import EditRequest
from sa_lens.edit_stats import key_second_moment
from sa_lens.errors import ConvergenceError, InputError
from sa_lens.eval_mode import eval_mode
from sa_lens.mlp_projection import MlpOutput, capture_keys, decoder_layer, mlp_output
from sa_lens.prompts import format_prompts, token_ids
from sa_lens.validation import is_finite_real

__all__ = ["CONTEXTS", "METHODS", "EditResult", "RomeOptions", "apply_edits", "default_edit_layer", "edit_scores", "knowledge_edit", "save_edited",
           "summarise_scores"]

CONTEXTS: tuple[str, ...] = (
    "",
    "Here is a short note. ",
    "The following is what I learned. ",
    "I read this in a book yesterday. ",
    "Someone asked me about it once. ",
    "This is worth remembering. ",
)
"""Prefixes the key and value are averaged over (ROME's context templates; the first, empty, is the bare prompt)."""

METHODS = ("rome", "memit")


def default_edit_layer(n_layers: int) -> int:
    """The layer edited when none is given: layer 5 of Llama-2-7b's 32 (the paper's code edits there and masks
    layers 4–6; paper-notes.md §1, §6.1), scaled to the model's depth: ``round(5 · n_layers / 32)``.
    SmolLM2-135M's 30 layers → 5; a 2-layer test model → 0."""
    return min(n_layers - 1, round(5 * n_layers / 32))


@dataclass(frozen=True)
class RomeOptions:
    """ROME's hyper-parameters (defaults: EasyEdit's Llama-2 ROME recipe, except ``steps`` and ``max_loss``).

    Attributes:
        steps: Adam steps for δ (at most; stops early below ``early_stop_loss``).
        lr: Adam learning rate for δ.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        weight_decay: weight of ‖δ‖/‖v‖².
        clamp_norm_factor: ‖δ‖ ≤ this × ‖v‖ (v: the projection's output at the key, before the edit).
        early_stop_loss: stop once the target NLL (nats/token) is below this.
        max_loss: the edit is refused (:class:`ConvergenceError`) if the target NLL it reached is above this.
        chat: put the prompt in the model's chat template as a user turn and the target as the assistant's reply
            (for chat models and NoIntentEdit-style question/answer edits); False reads the prompt as raw text.
        contexts: prefixes (see :data:`CONTEXTS`); with ``chat`` they open the user's message.
        ridge: C + ridge·(tr C / d)·I before solving, so a corpus with fewer tokens than keys still inverts.
        stats_texts: the corpus for C; None = the bundled text (:func:`sa_lens.edit_stats.bundled_texts`).
        mom2_update_weight: MEMIT only: λ in ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT's and EasyEdit's 15,000).

    Raises:
        ValueError: (on construction) a non-positive step count or learning rate, a negative or non-finite weight.
    """

    steps: int = 40
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    max_loss: float = 1.0
    chat: bool = False
    contexts: tuple[str, ...] = CONTEXTS
    ridge: float = 1e-4
    stats_texts: tuple[str, ...] | None = None
    mom2_update_weight: float = 15000.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer ≥ 1; got {self.steps!r}.")
        if not (is_finite_real(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number; got {self.lr!r}.")
        object.__setattr__(self, "lr", float(self.lr))
        for name in ("kl_factor", "weight_decay", "clamp_norm_factor", "early_stop_loss", "max_loss", "ridge",
                     "mom2_update_weight"):
            value = getattr(self, name)
            if not (is_finite_real(value) and value >= 0):
                raise InputError(f"{name} must be a finite number ≥ 0; got {value!r}.")
            object.__setattr__(self, name, float(value))  # lr=1 and lr=1.0 are one config (one fingerprint)
        # One string is refused, not read as a sequence of one-character texts.
        contexts = () if isinstance(self.contexts, str) else tuple(self.contexts)
        if not contexts or any(not isinstance(c, str) for c in contexts):
            raise InputError("contexts must be a non-empty sequence of strings (the first is usually '').")
        object.__setattr__(self, "contexts", contexts)
        if self.stats_texts is not None:
            texts = () if isinstance(self.stats_texts, str) else tuple(self.stats_texts)
            if not texts or any(not isinstance(t, str) for t in texts):
                raise InputError("stats_texts must be None (the bundled text) or a non-empty sequence of strings.")
            object.__setattr__(self, "stats_texts", texts)


@dataclass(frozen=True)
class EditResult:
    """What one ROME edit reached.

    Attributes:
        id: the request's id.
        layer: the edited layer.
        loss_start, loss: target NLL (nats/token, mean over the prefixed prompts) before and after optimising δ.
        steps: Adam steps taken.
        delta_ratio: ‖δ‖ / ‖v‖ (how far the value moved, relative to the projection's output).
        update_norm: ‖ΔW‖_F of the rank-one update.
    """

    id: str
    layer: int
    loss_start: float
    loss: float
    steps: int
    delta_ratio: float
    update_norm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Batch:
    """Right-padded rows: the prefixed prompts + target (all but its last token), then the KL prompts."""

    ids: Tensor
    mask: Tensor
    lookup: Tensor  # subject last-token index per row
    labels: Tensor  # target token per position, -100 elsewhere
    n_rewrite: int
    kl_rows: slice = field(default_factory=lambda: slice(0, 0))


def _hf_and_tokenizer(model, tokenizer):
    if is_bridge(model):
        return model.original_model, tokenizer or checkpoint_tokenizer(model)
    if tokenizer is None:
        raise InputError("A plain Hugging Face model needs its tokenizer: pass tokenizer=tok.")
    return model, tokenizer


def _prompt_ids(tokenizer, request: EditRequest, prompt: str, prefix: str, chat: bool) -> tuple[list[int], int]:
    """Token ids of the (prefixed, possibly chat-formatted) prompt and the index of the subject's last token."""
    content = prefix + request.text(prompt)
    end = len(prefix) + request.subject_span(prompt)[1]  # where the subject ends inside the content
    if chat:
        # Some templates trim the user's text (Llama-3, Gemma-2), some do not: give them none to trim, so the
        # content appears verbatim in the rendered prompt and the subject's offset inside it holds.
        end -= len(content) - len(content.lstrip())
        content = content.strip()
        text = format_prompts(tokenizer, [content])[0]
        where = text.rfind(content)
        if where < 0:
            raise InputError(
                f"edit {request.id!r}: the chat template rewrote the user's message {content!r}, so the subject "
                "cannot be located in the rendered prompt; edit with RomeOptions(chat=False) (raw text)."
            )
        at = where + end
    else:
        text, at = content, end
    ids = token_ids(tokenizer, [text])[0]
    last = len(token_ids(tokenizer, [text[:at]])[0]) - 1
    if not 0 <= last < len(ids):
        raise InputError(f"edit {request.id!r}: the subject {request.subject!r} has no token of its own in {text!r}.")
    return ids, last


def _target_ids(tokenizer, target: str) -> list[int]:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the target {target!r} has no tokens.")
    return ids


def _batch(tokenizer, request: EditRequest, options: RomeOptions, device) -> _Batch:
    rows, lookups, labels = [], [], []
    target = _target_ids(tokenizer, request.target)
    for prefix in options.contexts:
        ids, last = _prompt_ids(tokenizer, request, request.prompt, prefix, options.chat)
        rows.append(ids + target[:-1])
        lookups.append(last)
        labels.append([-100] * (len(ids) - 1) + target)
    kl = EditRequest("{} is a", request.subject, request.target, id=request.id)  # ROME's essence prompt, raw
    ids, last = _prompt_ids(tokenizer, kl, kl.prompt, "", False)
    rows.append(ids)
    lookups.append(last)
    labels.append([-100] * len(ids))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(options.contexts)
    return _Batch(
        ids=torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
        mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device),
        lookup=torch.tensor(lookups, device=device),
        labels=torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device),
        n_rewrite=n,
        kl_rows=slice(n, n + 1),
    )


def _target_nll(logits: Tensor, b: _Batch) -> Tensor:
    logp = logits[: b.n_rewrite].float().log_softmax(-1)
    labels = b.labels[: b.n_rewrite]
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (-(picked * keep).sum(1) / keep.sum(1)).mean()


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    # Only δ needs gradients; the weights' flags are given back as they were.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class _Value:
    """δ optimised at one module's output (ROME: the MLP output; MEMIT: the residual stream after a layer)."""

    delta: Tensor  # [d_model]
    v: Tensor  # the module's output at the bare prompt's subject token before the edit, [d_model]
    losses: list[float]
    steps: int
    keys: list[Tensor]  # what `capture` recorded on the first forward pass


def optimise_value(
    hf, module: torch.nn.Module, b: _Batch, options: RomeOptions, label: str, where: str,
    capture: MlpOutput | None = None,
) -> _Value:
    """Optimise δ added to ``module``'s output at each row's subject token (Meng et al. 2022, §3.1 Eq. 4).

    Loss: mean target NLL + ``kl_factor``·KL(now ‖ before) on ``"{subject} is a"`` + ``weight_decay``·‖δ‖/‖v‖²;
    ‖δ‖ ≤ ``clamp_norm_factor``·‖v‖. ``module``'s output may be a tensor or a tuple whose first item is the hidden
    state (a decoder layer). With ``capture``, that projection's keys at the subject tokens are read on the first pass.

    Raises:
        ConvergenceError: the target NLL reached is above ``options.max_loss`` (the message gives it).
    """
    device = b.ids.device
    rows = torch.arange(b.ids.shape[0], device=device)
    state: dict[str, Tensor] = {}
    delta: Tensor | None = None

    def add_delta(_module, _args, out):
        nonlocal delta
        h = out[0] if isinstance(out, tuple) else out
        if "v" not in state:
            state["v"] = h[0, b.lookup[0]].detach().float()  # the bare prompt's value (W k₀ + b for ROME)
            delta = torch.zeros_like(state["v"], requires_grad=True)
        h = h.clone()
        h[rows, b.lookup] += delta.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    keys: list[Tensor] = []
    losses: list[float] = []
    handle = module.register_forward_hook(add_delta)
    try:
        with _frozen(hf), eval_mode(hf):
            with capture_keys(capture, b.lookup, keys) if capture else contextlib.nullcontext(), torch.no_grad():
                logits = hf(input_ids=b.ids, attention_mask=b.mask).logits
            kl_init = logits[b.kl_rows, :, :][torch.arange(1), b.lookup[b.kl_rows]].float().log_softmax(-1)
            optimiser = torch.optim.Adam([delta], lr=options.lr)
            steps = 0
            while True:
                logits = hf(input_ids=b.ids, attention_mask=b.mask).logits
                nll = _target_nll(logits, b)
                losses.append(nll.item())
                if nll.item() < options.early_stop_loss or steps == options.steps:
                    break
                kl_now = logits[b.kl_rows, :, :][torch.arange(1), b.lookup[b.kl_rows]].float().log_softmax(-1)
                kl = F.kl_div(kl_init, kl_now, log_target=True, reduction="batchmean")  # KL(now ‖ init), as ROME's code
                decay = delta.norm() / state["v"].norm() ** 2
                loss = nll + options.kl_factor * kl + options.weight_decay * decay
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                steps += 1
                with torch.no_grad():
                    limit = options.clamp_norm_factor * state["v"].norm()
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    if not losses[-1] <= options.max_loss:  # NaN fails too
        raise ConvergenceError(
            f"edit {label} did not converge {where}: target NLL {losses[-1]:.3f} nats/token after {steps} steps (started at "
            f"{losses[0]:.3f}; max_loss {options.max_loss}). Raise steps or lr, pick another layer, or accept it "
            "with a larger max_loss. Nothing was applied."
        )
    return _Value(delta.detach(), state["v"], losses, steps, keys)


def _rome_update(
    hf, tokenizer, site: MlpOutput, request: EditRequest, options: RomeOptions
) -> tuple[Float[Tensor, "d_model d_mlp"], EditResult]:
    """ΔW for one request on the model as it is now (nothing is written)."""
    b = _batch(tokenizer, request, options, site.weight.device)
    value = optimise_value(hf, site.module, b, options, repr(request.id), f"at layer {site.layer}",
                           capture=site)
    key_rows = value.keys[0][: b.n_rewrite]
    k_star, k_0 = key_rows.mean(0).double(), key_rows[0].double()
    c = _second_moment(hf, tokenizer, site, options)
    u = torch.linalg.solve(c, k_star)
    u = u / u.norm()
    right = value.delta.double() / (k_0 @ u)
    update = torch.outer(right, u).float()
    result = EditResult(request.id, site.layer, value.losses[0], value.losses[-1], value.steps,
                        (value.delta.norm() / value.v.norm()).item(), update.norm().item())
    return update, result


def _second_moment(hf, tokenizer, site: MlpOutput, options: RomeOptions) -> Tensor:
    """C (float64, on the weight's device) with the stated ridge: C + ridge·(tr C / d)·I."""
    mom2, _ = key_second_moment(hf, tokenizer, site, options.stats_texts, progress=False)
    c = mom2.double().to(site.weight.device)
    return c + options.ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def _requests(edits: Sequence[EditRequest | Mapping]) -> list[EditRequest]:
    if isinstance(edits, (EditRequest, Mapping, str)):
        raise InputError("edits must be a list of requests (EditRequest or rows), not one; wrap it: [edit].")
    out = [e if isinstance(e, EditRequest) else EditRequest.from_row(e, i) for i, e in enumerate(edits)]
    if not out:
        raise InputError("edits is empty; pass at least one request.")
    return out


def _layers(layer: int | Sequence[int], method: str) -> list[int]:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}; got {method!r}.")
    if isinstance(layer, Sequence) and not isinstance(layer, str):
        layers = list(layer)
        if method == "rome" and len(layers) != 1:
            raise InputError(f"ROME edits one layer; got {layers}. Pass one layer, or method='memit' for several.")
        if not layers or len(set(layers)) != len(layers):
            raise InputError(f"layers must be distinct and at least one; got {layers}.")
        return sorted(layers)
    return [layer]


def _memit(hf, tok, sites: list[MlpOutput], z_module, requests: list[EditRequest], options: RomeOptions,
           progress: bool) -> list[EditResult]:
    """MEMIT (Meng et al. 2023, Alg. 1): one batch of requests spread over ``sites``' layers, in place."""
    device = sites[0].weight.device
    batches = [_batch(tok, r, options, device) for r in requests]
    last = sites[-1].layer
    values = [optimise_value(hf, z_module, b, options, repr(r.id), f"at the residual stream after layer {last}")
              for r, b in tqdm(list(zip(requests, batches)), desc=f"MEMIT z L{last}", disable=not progress)]
    zs = torch.stack([v.v + v.delta for v in values]).double()  # target residual streams, [n, d_model]
    # Every layer's C from the unedited model, as MEMIT's code (and so cached across batches).
    covariances = [_second_moment(hf, tok, site, options) for site in sites]
    norms = []
    for i, (site, c) in enumerate(zip(sites, covariances)):
        keys, current = [], []
        with eval_mode(hf), torch.no_grad():
            for b in batches:
                k: list[Tensor] = []
                z: list[Tensor] = []
                with capture_keys(site, b.lookup, k), _capture_output(z_module, b.lookup, z):
                    hf(input_ids=b.ids, attention_mask=b.mask)
                keys.append(k[0][: b.n_rewrite].mean(0))
                current.append(z[0][0])  # the bare prompt's residual stream now
        k_mat = torch.stack(keys).double().T  # [d_mlp, n]
        resid = (zs - torch.stack(current).double()).T / (len(sites) - i)  # what is left, shared by the layers left
        adj = torch.linalg.solve(options.mom2_update_weight * c + k_mat @ k_mat.T, k_mat)
        update = (resid @ adj.T).float()  # [d_model, d_mlp]
        with torch.no_grad():
            site.weight.add_(site.update(update))
        norms.append(update.norm().item() ** 2)
    total = sum(norms) ** 0.5
    return [EditResult(r.id, last, v.losses[0], v.losses[-1], v.steps, (v.delta.norm() / v.v.norm()).item(), total)
            for r, v in zip(requests, values)]


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module, positions: Tensor, out: list[Tensor]) -> Iterator[None]:
    def hook(_module, _args, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        out.append(h[torch.arange(h.shape[0], device=h.device), positions.to(h.device)].detach().float())

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _snapshot(model, layer, method: str) -> tuple[list[MlpOutput], list[Tensor]]:
    """The projections an edit will write, and a copy of each weight to restore (the only copies taken)."""
    sites = [mlp_output(model, i) for i in _layers(layer, method)]
    return sites, [site.weight.detach().clone() for site in sites]


def _restore(sites: list[MlpOutput], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for site, weight in zip(sites, saved):
            site.weight.copy_(weight)


def _apply(model, sites: list[MlpOutput], saved: list[Tensor], edits, options: RomeOptions | None, tokenizer,
           progress: bool, method: str) -> list[EditResult]:
    """Apply the edits in place, all or none: on any error the weights are written back before the error propagates."""
    requests = _requests(edits)
    options = options or RomeOptions()
    hf, tok = _hf_and_tokenizer(model, tokenizer)
    z_module = decoder_layer(model, sites[-1].layer) if method == "memit" else None
    if options.chat and not getattr(tok, "chat_template", None):
        raise InputError("chat=True needs a tokenizer with a chat template; pass RomeOptions(chat=False) for raw prompts.")
    for r in requests:  # every request's tokens, before any optimisation
        _batch(tok, r, options, sites[0].weight.device)
    try:
        if method == "memit":
            return _memit(hf, tok, sites, z_module, requests, options, progress)
        results = []
        for r in tqdm(requests, desc=f"ROME L{sites[0].layer}", disable=not progress):
            update, result = _rome_update(hf, tok, sites[0], r, options)
            with torch.no_grad():
                sites[0].weight.add_(sites[0].update(update))
            results.append(result)
        return results
    except BaseException:
        _restore(sites, saved)
        raise


@contextlib.contextmanager
def knowledge_edit(
    model,
    edits: Sequence[EditRequest | Mapping],
    layer: int | Sequence[int],
    options: RomeOptions | None = None,
    *,
    method: str = "rome",
    tokenizer=None,
    progress: bool = False,
) -> Iterator[list[EditResult]]:
    """Knowledge-edit ``model`` inside a ``with`` block; its weights are written back bit for bit on exit.

    Example::

        with sal.knowledge_edit(model, [EditRequest("{} is located in", "The Eiffel Tower", " Rome")], layer=5) as res:
            print(res[0].loss)      # the target NLL reached, nats/token

    Args:
        model: a TransformerBridge or a Hugging Face causal LM (edited where its weights live).
        edits: requests (:class:`~sa_lens.edit_requests.EditRequest`) or rows of either documented form.
        layer: ROME: the decoder layer whose MLP output projection is edited (Llama-2-7b: 5, as the paper's code
            implies; :func:`default_edit_layer`). MEMIT: the layers the batch is spread over (e.g. ``(3, 4, 5)``).
        options: :class:`RomeOptions` (MEMIT's value optimisation uses the same ones, at the residual stream).
        method: ``"rome"`` (default; one request after the other, Meng et al. 2022) or ``"memit"`` (all requests
            in one batch update over ``layer``'s layers, Meng et al. 2023).
        tokenizer: for a plain HF model (a bridge's own checkpoint tokenizer is used otherwise).
        progress: a tqdm bar over the edits.

    Yields:
        One :class:`EditResult` per request.

    Raises:
        ValueError: a subject not in its prompt, a layer out of range, an architecture without one locatable MLP
            output projection, several layers for ROME, an unknown method, a plain HF model without tokenizer,
            ``chat`` without a chat template.
        ConvergenceError: an edit whose target NLL stayed above ``options.max_loss`` (the message gives the loss).
        In every error case nothing stays applied.
    """
    sites, saved = _snapshot(model, layer, method)
    results = _apply(model, sites, saved, edits, options, tokenizer, progress, method)
    try:
        yield results
    finally:
        _restore(sites, saved)


def apply_edits(
    model,
    edits: Sequence[EditRequest | Mapping],
    layer: int | Sequence[int],
    options: RomeOptions | None = None,
    *,
    method: str = "rome",
    tokenizer=None,
    progress: bool = False,
) -> list[EditResult]:
    """Apply knowledge edits permanently (all or none). Arguments, results and errors as :func:`knowledge_edit`."""
    sites, saved = _snapshot(model, layer, method)
    return _apply(model, sites, saved, edits, options, tokenizer, progress, method)


def save_edited(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write an edited model (e.g. after :func:`apply_edits`) as a ``from_pretrained`` folder with its tokenizer.

    A bridge is saved under its checkpoint names (:func:`sa_lens.export.save_checkpoint`).

    Raises:
        ValueError: a plain HF model without tokenizer (the folder would not load with ``sa_lens.load_model``).
    """
    from sa_lens.export import save_checkpoint

    _, tok = _hf_and_tokenizer(model, tokenizer)
    return save_checkpoint(model, out_dir, tok)


def _mean_logprob(hf, tokenizer, prompts: list[str], answers: list[str], chat: bool) -> list[float]:
    """Mean log-probability per token (nats) of each answer after its prompt, read as an edit reads it."""
    out = []
    device = next(hf.parameters()).device
    with eval_mode(hf), torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            text = format_prompts(tokenizer, [prompt])[0] if chat else prompt
            head = token_ids(tokenizer, [text])[0]
            tail = _target_ids(tokenizer, answer)
            ids = torch.tensor([head + tail], device=device)
            logp = hf(input_ids=ids).logits[0, len(head) - 1 : -1].float().log_softmax(-1)
            out.append(logp.gather(-1, torch.tensor(tail, device=device).unsqueeze(-1)).mean().item())
    return out


def edit_scores(
    model,
    edits: Sequence[EditRequest | Mapping],
    *,
    old_answers: Sequence[str | None] | None = None,
    chat: bool = False,
    tokenizer=None,
) -> list[dict]:
    """CounterFact-style scores of each request on ``model`` as it is now (call it inside the edit's block).

    Answers are compared by mean log-probability per token, so answers of different lengths compare fairly.

    Args:
        edits: the requests.
        old_answers: per request, the answer the edit replaces when the request has no ``target_true`` (e.g. the
            unedited model's greedy reply); None entries leave efficacy and generalisation unmeasured.
        chat: read prompts through the chat template (as the edit was made with ``RomeOptions(chat=True)``).
        tokenizer: for a plain HF model.

    Returns:
        Per request: ``id``; ``target_logprob`` (nats/token); ``efficacy`` (1.0 if the new answer beats the old on
        the edit prompt, else 0.0; None without an old answer); ``generalisation`` (the same, averaged over
        paraphrases; None without any); ``specificity`` (share of neighbour facts whose true answer still beats
        the new target; None without neighbours).

    Raises:
        ValueError: ``old_answers`` of another length than ``edits``.
    """
    requests = _requests(edits)
    hf, tok = _hf_and_tokenizer(model, tokenizer)
    olds = list(old_answers) if old_answers is not None else [None] * len(requests)
    if len(olds) != len(requests):
        raise InputError(f"old_answers has {len(olds)} entries for {len(requests)} edits.")
    scores = []
    for r, old in zip(requests, olds):
        old = r.target_true or old
        prompts = [r.text(), *(r.text(p) for p in r.paraphrases)]
        new_lp = _mean_logprob(hf, tok, prompts, [r.target] * len(prompts), chat)
        row: dict = {"id": r.id, "target_logprob": new_lp[0], "efficacy": None, "generalisation": None,
                     "specificity": None}
        if old:
            old_lp = _mean_logprob(hf, tok, prompts, [old] * len(prompts), chat)
            wins = [float(n > o) for n, o in zip(new_lp, old_lp)]
            row["efficacy"] = wins[0]
            if r.paraphrases:
                row["generalisation"] = sum(wins[1:]) / len(r.paraphrases)
        if r.neighbours:
            texts = [p for p, _ in r.neighbours]
            true_lp = _mean_logprob(hf, tok, texts, [t for _, t in r.neighbours], chat)
            new_n = _mean_logprob(hf, tok, texts, [r.target] * len(texts), chat)
            row["specificity"] = sum(float(t > n) for t, n in zip(true_lp, new_n)) / len(texts)
        scores.append(row)
    return scores


def summarise_scores(scores: Sequence[Mapping]) -> dict[str, float | None]:
    """Mean efficacy, generalisation and specificity over the requests that have each (None if none has it:
    JSON-safe, where NaN is not)."""
    out = {}
    for key in ("efficacy", "generalisation", "specificity"):
        values = [s[key] for s in scores if s.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
