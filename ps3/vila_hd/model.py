"""VilaHD: PS3 encoder + projector + a causal LM, with patch selection driven by the LLM.

One forward is the paper's two-pass step (section 3): pass 1 runs the LLM without
gradients over the conversation up to the end of the user's first question, with only
low-res image tokens, and its last-layer state there becomes (through the prompt head) the
PS3 selection prompt; PS3 then encodes the selected high-res patches, and pass 2 runs the
LLM over the whole conversation with low-res and high-res image tokens. Selection is
discrete (top-k), so the LM loss never reaches the prompt head or the selection modules:
they learn from the token-selection loss alone (`ps3.vila_hd.losses`).

Each image becomes `[low-res tokens | kept high-res tokens by scale, raster order | newline]`
in place of its `<image>` placeholder; the low-res part is always there, so no image ever
has an empty sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ps3.data.views import normalize_pixels
from ps3.model.forward import count_looks, run_looks
from ps3.model.layers import checkpoints_block
from ps3.model.selection import apply_gt_override
from ps3.model.vision import LowRes, PS3VisionEncoder, resize_square

from .conversations import IGNORE_INDEX as IGNORE  # labels the loss does not score
from .params import LOOK_CLOSE_MODES
from .projector import MMProjector, merge_2x2, whole_blocks


@dataclass
class Selection:
    """How many high-res patches each image gets and how they are chosen.

    The fields are VILA-HD's inference knobs under their own names: LOOK_CLOSE_MODE (`mode`),
    NUM_LOOK_CLOSE, NUM_TOKEN_LOOK_CLOSE (wins over looks), SELECT_NUM_EACH_SCALE (the
    per-look split across high-res scales; the preset's, proportional to area, by default)
    and SMOOTH_SELECTION_PROB. `dynamic_resolution` is appendix C's 4K rule: images whose
    long side is under the midpoint of the top two scales select only below the top scale.
    `gt_forced` puts a sample's box cells first (training only).
    """

    mode: str = "after_prompt"
    num_look_close: int | str = 1
    num_token_look_close: int | None = None
    select_num_each_scale: tuple[int, ...] | None = None
    smooth_selection_prob: bool = False
    dynamic_resolution: bool = False
    gt_forced: bool = False

    def __post_init__(self) -> None:
        if self.mode not in LOOK_CLOSE_MODES:
            raise ValueError(f"look-close mode must be one of {LOOK_CLOSE_MODES}, got {self.mode!r}")

    def budgets(self, enc: PS3VisionEncoder) -> tuple[int, ...]:
        return tuple(self.select_num_each_scale or enc.preset.budgets)

    def patches(self, enc: PS3VisionEncoder) -> int:
        """High-res patches an image gets (at most)."""
        per_look = sum(self.budgets(enc))
        looks = count_looks(enc, self.num_look_close, self.num_token_look_close, per_look)
        # the last look takes what is left: 6 looks of 2560 at 1.5K encode all 14580, not 15360
        return min(sum(per_look if n is None else n for n in looks), enc.preset.max_highres_tokens)

    def image_tokens(self, enc: PS3VisionEncoder) -> int:
        """LLM tokens an image can take at most: low-res, whole 2x2 blocks of patches, newline.
        What the context length must make room for (it grows with the budget)."""
        low = math.ceil(enc.preset.grids[0] / 2) ** 2
        return low + self.patches(enc) // 4 + 1


@dataclass
class VilaHDOutput:
    lm_loss: torch.Tensor  # scalar; an exact zero in the graph when no token is labelled
    logits: torch.Tensor  # [B, L', V] over the spliced sequence
    labels: torch.Tensor  # [B, L'] aligned with logits (-100 = not scored)
    selection_probs: list[torch.Tensor]  # per high-res scale [N, G_s, G_s], with gradient
    selected: list[torch.Tensor]  # per high-res scale bool [N, G_s, G_s]: the encoded cells
    image_tokens: list[int] = field(default_factory=list)  # LLM tokens per image
    ghost: torch.Tensor | None = None  # 0 x every output that fed no loss (equal forwards on every rank)


class VilaHD(nn.Module):
    """The PS3 vision tower, the projector (`mm_projector`) and the LLM (`llm`)."""

    #: Parameter-name parts trained without weight decay besides 1-D ones: PS3's position
    #: embeddings and latent query, the high-res position/scale embeddings, the LLM's tokens.
    no_weight_decay_keys = ("pos_embed", "pos_emb_residual", "attn_pool.latent", "high_res_pos_embed",
                            "high_res_scale_embed", "embed_tokens")

    def __init__(self, vision: PS3VisionEncoder, llm: nn.Module, *, image_token_id: int, newline_token_id: int,
                 prompt_head: str = "linear") -> None:
        super().__init__()
        p = vision.preset
        self.vision_tower = vision
        self.llm = llm
        self.mm_projector = MMProjector(p.width, llm.config.hidden_size, low_grid=p.grids[0],
                                        num_scales=len(p.scales), prompt_head=prompt_head)
        self.image_token_id = image_token_id
        self.newline_token_id = newline_token_id

    @classmethod
    def on_llm(cls, vision: PS3VisionEncoder, llm, *, prompt_head: str = "linear") -> VilaHD:
        """A VilaHD on a loaded LLM (`llm.LoadedLLM`): its image token, and the tokenizer's
        newline as the token that ends each image."""
        newline = llm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
        return cls(vision, llm.model, image_token_id=llm.image_token_id, newline_token_id=newline,
                   prompt_head=prompt_head)

    def blocks(self) -> list[nn.Module]:
        """The units FSDP2 shards one by one: PS3's blocks and the LLM's decoder layers."""
        return [*self.vision_tower.trunk.blocks, *self.llm.model.layers]

    def set_grad_checkpointing(self, enable: bool = True, *, every: int = 1) -> None:
        """Recompute every ``every``-th PS3 block and LLM decoder layer in backward (the spec's
        activation checkpointing; 2 is every other one, as ``checkpoints_block`` counts)."""
        self.vision_tower.set_grad_checkpointing(enable, every=every)
        if not enable:
            self.llm.gradient_checkpointing_disable()
            return
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for index, layer in enumerate(self.llm.model.layers):  # HF turned every layer on; keep every N-th
            layer.gradient_checkpointing = checkpoints_block(index, every)

    # ---- the two passes --------------------------------------------------------------
    def forward(self, batch: dict, selection: Selection) -> VilaHDOutput:
        embeds, mask, labels, out = self.embed(batch, selection)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        out.lm_loss, out.logits, out.labels = causal_lm_loss(logits, labels), logits, labels
        if torch.is_grad_enabled():
            out.ghost = self._unused_in_graph() + (out.ghost if out.ghost is not None else 0.0)
        return out

    def _unused_in_graph(self) -> torch.Tensor:
        """0 x every trainable projector and selection parameter and PS3's bottom-up prior.

        A micro-batch may leave some of them unused (a scale with no whole block, the prompt
        head in a bottom-up stage, the prior in a top-down one unless a stand-in image selects
        bottom-up), and DDP and FSDP need every rank to reduce the same set of
        gradients. It is taken here, inside forward, where FSDP2 has put the unsharded
        parameters on the modules: outside it they are sharded DTensors, which the loss must
        not mix with its plain tensors.
        """
        vision = self.vision_tower
        params = [*self.mm_projector.parameters(), vision.prior_prompt,
                  *(p for name in SELECTION_MODULES for p in getattr(vision, name).parameters())]
        return 0.0 * sum(p.sum() for p in params if p.requires_grad)

    @torch.no_grad()
    def generate(self, batch: dict, selection: Selection, *, max_new_tokens: int = 16) -> tuple[torch.Tensor, VilaHDOutput]:
        """Greedy answers to conversations that end with the generation prompt: new token ids
        [B, T] (padded with the pad/eos id after each answer's end) and the selection made.

        The spliced sequences are left-padded, as decoder-only generation needs, and handed to
        the LLM's own `generate`, so its KV cache serves every new token.
        """
        embeds, mask, _, out = self.embed(batch, selection)
        lengths = mask.sum(1)
        shift = embeds.shape[1] - lengths  # [B]: move each row's tokens to the right edge
        index = (torch.arange(embeds.shape[1], device=embeds.device)[None] - shift[:, None]) % embeds.shape[1]
        left = embeds.gather(1, index[..., None].expand_as(embeds))
        left_mask = torch.arange(embeds.shape[1], device=embeds.device)[None] >= shift[:, None]
        left = left * left_mask[..., None]
        config = self.llm.generation_config
        tokens = self.llm.generate(inputs_embeds=left, attention_mask=left_mask.long(), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=config.pad_token_id or config.eos_token_id)
        return tokens, out

    def embed(self, batch: dict, selection: Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, VilaHDOutput]:
        """Pass 1 and the vision tower: the LLM's input embeddings [B, L', H], attention mask,
        labels, and the selection made (an output whose loss and logits are still unset)."""
        images, owner, dummy = self._pixels(batch)
        enc = self.vision_tower
        low = enc.encode_lowres(resize_square(images, enc.preset.scales[0]))
        feats = enc.selection_features(low, resize_square(images, enc.preset.selection_view_size))
        low_tokens = self._lowres_tokens(low.tokens)  # [N, n0, H]
        ghosts = []
        prompt = None
        if selection.mode == "after_prompt":
            prompt, ghost = self._prompt_for_images(batch, low_tokens, owner, dummy)
            ghosts += [ghost] if ghost is not None else []
        probs = enc.selection_probs(feats, prompt)
        if selection.smooth_selection_prob:
            probs = [smooth_probs(p) for p in probs]
        chosen = probs
        if selection.mode == "random":
            chosen = [torch.rand_like(p) for p in probs]
        if selection.gt_forced and not dummy:
            chosen = apply_gt_override(chosen, box_maps(batch["boxes"], batch["has_box"], enc.preset.grids[1:]))
        highres, selected, stand_in = self._highres_tokens(images, low, chosen, selection, batch.get("image_sizes"))
        ghosts += [stand_in] if stand_in is not None else []
        if dummy:  # no image in this micro-batch: the tower ran anyway, its outputs count for nothing
            ghosts.append(0.0 * (low_tokens.sum() + sum(t.sum() for t in highres) + sum(p.sum() for p in probs)))
            low_tokens, highres = low_tokens[:0], highres[:0]
        ghost = sum(ghosts) if ghosts else None
        sequences = [self._image_sequence(low_tokens[n], highres[n]) for n in range(len(low_tokens))]
        embeds, mask, labels = self._splice(batch, sequences)
        empty = embeds.new_zeros(())
        return embeds, mask, labels, VilaHDOutput(empty, empty, labels, probs, selected,
                                                  [len(s) for s in sequences], ghost)

    def _prompt_for_images(self, batch: dict, low_tokens: torch.Tensor, owner: torch.Tensor, dummy: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(top-down prompt per image [N, D], ghost): pass 1 runs on every rank in top-down mode.

        A micro-batch without images still runs pass 1, over its text alone, and throws the
        prompt away (the stand-in image selects bottom-up): FSDP2 all-gathers each decoder
        layer on every LLM forward, so a rank that skipped pass 1 would run one forward fewer
        than its peers and they would wait for it forever.
        """
        if not dummy:
            return self.top_down_prompt(batch, low_tokens)[owner], None
        unused = self.top_down_prompt(batch, low_tokens[:0])  # [B, D]: no image to select for
        return None, 0.0 * unused.sum()

    @torch.no_grad()
    def _prompt_state(self, batch: dict, low_tokens: torch.Tensor) -> torch.Tensor:
        """Pass 1: the LLM's last-layer state [B, H] at each conversation's prompt end, seeing
        low-res image tokens only (no gradient: the prompt is a detached input to the head)."""
        sequences = [self._image_sequence(t, t[:0]) for t in low_tokens]
        embeds, mask, _, ends = self._splice(batch, sequences, upto_prompt_end=True)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return hidden[torch.arange(len(ends), device=hidden.device), ends]

    def top_down_prompt(self, batch: dict, low_tokens: torch.Tensor) -> torch.Tensor:
        """PS3 selection prompts [B, D], one per conversation; gradient reaches the head only."""
        state = self._prompt_state(batch, low_tokens.detach())
        return self.mm_projector.prompt(state.to(self.mm_projector.high_res_pos_embed.dtype))

    # ---- images -> LLM tokens ---------------------------------------------------------
    def _pixels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Normalised images [N, 3, S, S], the conversation of each, and whether they are a
        stand-in: a micro-batch without images still runs the tower once, so every rank runs
        the same forwards (FSDP and DDP hang otherwise)."""
        images = batch["images"]
        dtype = self.mm_projector.high_res_pos_embed.dtype
        owner = _owners(batch["input_ids"], self.image_token_id)
        dummy = images.shape[0] == 0
        if dummy:
            top = self.vision_tower.preset.scales[-1]
            images = torch.zeros(1, 3, top, top, dtype=torch.uint8, device=images.device)
        return normalize_pixels(images, dtype), owner, dummy  # PS3's mean/std 0.5, rounded to dtype once

    def _lowres_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, d = tokens.shape
        g = self.vision_tower.preset.grids[0]
        merged = merge_2x2(tokens.reshape(n, g, g, d))
        return self.mm_projector.project(merged) + self.mm_projector.position(math.ceil(g / 2), 0)

    def _highres_tokens(self, images: torch.Tensor, low, probs: list[torch.Tensor], selection: Selection,
                        image_sizes: torch.Tensor | None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Kept high-res LLM tokens per image (list of [k_n, H]), the encoded cells per scale, and
        0 x a stand-in group's output (None without one): what keeps it in backward on every rank."""
        enc, p = self.vision_tower, self.vision_tower.preset
        n = images.shape[0]
        selected = [torch.zeros(n, g, g, dtype=torch.bool, device=images.device) for g in p.grids[1:]]
        canvases = [images.new_zeros(n, g * g, p.width) for g in p.grids[1:]]
        highres = [resize_square(images, s) for s in p.scales[1:]]
        ghost = None
        for rows, budgets, stand_in in self._groups(selection, image_sizes, n, images.device):
            looks = count_looks(enc, selection.num_look_close, selection.num_token_look_close, sum(budgets))
            if not looks:
                continue
            part = _subset_lowres(low, rows)
            idx_parts, tok_parts = run_looks(enc, part, [pr[rows] for pr in probs], [h[rows] for h in highres],
                                             looks, budgets)
            if stand_in:  # run for equal forwards only: its cells are not the image's selection
                ghost = 0.0 * sum(t.sum() for parts in tok_parts for t in parts)
                continue
            for s, (idx, tok) in enumerate(zip(idx_parts, tok_parts)):
                idx, tok = torch.cat(idx, 1), torch.cat(tok, 1).to(canvases[s].dtype)
                grid = canvases[s][rows].scatter(1, idx[..., None].expand_as(tok), tok)
                canvases[s] = canvases[s].index_copy(0, rows, grid)
                hit = torch.zeros(len(rows), p.grids[s + 1] ** 2, dtype=torch.bool, device=idx.device)
                selected[s][rows] = hit.scatter_(1, idx, True).reshape(len(rows), *selected[s].shape[1:])
        per_image = [[] for _ in range(n)]
        for s, (canvas, sel) in enumerate(zip(canvases, selected)):
            g = p.grids[s + 1]
            keep = whole_blocks(sel)  # [N, h*h]
            merged = merge_2x2(canvas.reshape(n, g, g, p.width))
            tokens = self.mm_projector.project(merged[keep])  # only whole blocks are projected
            tokens = tokens + self.mm_projector.position(math.ceil(g / 2), s + 1)[keep.nonzero()[:, 1]]
            for i, chunk in enumerate(tokens.split(keep.sum(1).tolist())):
                per_image[i].append(chunk)
        return [torch.cat(parts) for parts in per_image], selected, ghost

    def _groups(self, selection: Selection, image_sizes: torch.Tensor | None, n: int, device
                ) -> list[_Group]:
        """Groups of images that select alike, each with its per-look budgets per scale.

        With dynamic resolution (three or more high-res scales), images whose long side is
        under the midpoint of the top two scales give the top scale's budget to the others in
        proportion to their area. Both groups always run, so every rank runs the same forwards
        whatever its images' sizes: an empty group runs on image 0 as a stand-in, and its
        output is thrown away (it would otherwise overwrite image 0's own selection).
        """
        enc, p = self.vision_tower, self.vision_tower.preset
        budgets = selection.budgets(enc)
        everyone = torch.arange(n, device=device)
        if not selection.dynamic_resolution or p.num_highres_scales < 2 or image_sizes is None:
            return [_Group(everyone, budgets, stand_in=False)]
        small = image_sizes.max(dim=1).values.to(device) < (p.scales[-2] + p.scales[-1]) / 2
        areas = [s * s for s in p.scales[1:-1]]
        total = sum(budgets)
        lower = [total * a // sum(areas) for a in areas]
        lower[-1] += total - sum(lower)
        groups = []
        for rows, group_budgets in ((everyone[small], (*lower, 0)), (everyone[~small], budgets)):
            empty = not len(rows)
            groups.append(_Group(everyone[:1] if empty else rows, group_budgets, stand_in=empty))
        return groups

    def _image_sequence(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        newline = self.llm.get_input_embeddings().weight[self.newline_token_id][None]
        return torch.cat([low, high.to(low.dtype), newline.to(low.dtype)])

    # ---- text + images -> one sequence ------------------------------------------------
    def _splice(self, batch: dict, images: list[torch.Tensor], *, upto_prompt_end: bool = False):
        """Each `<image>` placeholder replaced by its image's tokens; right-padded.

        Returns inputs_embeds [B, L', H], attention mask, labels (-100 on image tokens) and,
        with `upto_prompt_end`, the index of each prompt's last token in the new sequence.
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
        embed = self.llm.get_input_embeddings()
        rows, row_labels, ends, n = [], [], [], 0
        for b in range(ids.shape[0]):
            length = int(batch["prompt_end"][b]) + 1 if upto_prompt_end else int(mask[b].sum())
            seq, lab = ids[b, :length], labels[b, :length]
            is_image = seq == self.image_token_id
            text = embed(seq.masked_fill(is_image, 0))
            parts, part_labels, start = [], [], 0
            for pos in is_image.nonzero()[:, 0].tolist():
                parts += [text[start:pos], images[n].to(text.dtype)]
                part_labels += [lab[start:pos], lab.new_full((len(images[n]),), IGNORE)]
                start, n = pos + 1, n + 1
            parts.append(text[start:])
            part_labels.append(lab[start:])
            rows.append(torch.cat(parts))
            row_labels.append(torch.cat(part_labels))
            ends.append(len(rows[-1]) - 1)
        if n != len(images):
            raise ValueError(f"{len(images)} images but {n} <image> placeholders in the batch")
        longest = max(len(r) for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, longest - len(r))) for r in rows])
        attention = torch.stack([torch.arange(longest, device=ids.device) < len(r) for r in rows]).long()
        padded = torch.stack([F.pad(lab, (0, longest - len(lab)), value=IGNORE) for lab in row_labels])
        if upto_prompt_end:
            return embeds, attention, padded, torch.tensor(ends, device=ids.device)
        return embeds, attention, padded


SELECTION_MODULES = ("selection_feature_proj", "highres_selection_feature_module", "prompt_proj_for_highres")
"""The PS3 modules that make selection maps (the selection stage's trainable unit)."""


class _Group(NamedTuple):
    """Images that select alike (`VilaHD._groups`)."""

    rows: torch.Tensor  # indices of the micro-batch's images
    budgets: tuple[int, ...]  # per-look patches per high-res scale
    stand_in: bool  # no image of the micro-batch is in it: runs on image 0, output discarded


def _owners(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The conversation index of every image, in order of appearance."""
    return (input_ids == image_token_id).nonzero()[:, 0]


def _subset_lowres(low: LowRes, rows: torch.Tensor) -> LowRes:
    """The low-res results (pooled, K/V, tokens) of some images only."""
    return LowRes(low.pooled[rows], low.tokens[rows], {k: v[rows] for k, v in low.hidden.items()},
                  [(k[rows], v[rows]) for k, v in low.kv])


def smooth_probs(probs: torch.Tensor, cells: int = 6) -> torch.Tensor:
    """SMOOTH_SELECTION_PROB: the map pooled to 6x6 and spread back, so selection takes whole
    regions rather than scattered cells."""
    g = probs.shape[-1]
    pooled = F.adaptive_avg_pool2d(probs[:, None].float(), cells)
    return F.interpolate(pooled, size=(g, g), mode="nearest")[:, 0].to(probs.dtype)


def box_maps(boxes: torch.Tensor, has_box: torch.Tensor, grids: tuple[int, ...]) -> list[torch.Tensor]:
    """Per grid [N, G, G] in {0, 1}: the cells a normalised box [N, 4] touches (none without a box).

    The box map area-resized to the grid and binarised (> 0), as VILA-HD's selection
    targets are: a cell partly in the box counts.
    """
    out = []
    for g in grids:
        edges = torch.arange(g, device=boxes.device, dtype=torch.float32) / g
        x = (torch.minimum(boxes[:, 2:3], edges + 1 / g) - torch.maximum(boxes[:, 0:1], edges)) > 0  # [N, G]
        y = (torch.minimum(boxes[:, 3:4], edges + 1 / g) - torch.maximum(boxes[:, 1:2], edges)) > 0
        out.append((y[:, :, None] & x[:, None, :] & has_box[:, None, None].bool()).float())
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled tokens; an exact zero (still in the graph) when a
    micro-batch has none, as grounding batches do."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    scored = shift_labels != IGNORE
    if not scored.any():
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits[scored], shift_labels[scored])
