"""The Wan policy's text: the prompt states its cross-attention reads, from the source --text names.

The prompt encoder (UMT5-XXL, 5.7B parameters) does not run in the loop. --text is
    a .safetensors file   UMT5's states, one (L, D) tensor per prompt, keyed by the prompt:
                          `python adapters.py embed` writes '' and every caption, each cleaned as
                          WanPipeline's prompt_clean does without ftfy (adapters.clean_prompt)
    'module:function'     a function, prompts -> (B, L, D)
    'tokens'              a fixed random vector per word of postflow's vocabulary (tests)
    'learned'             a pixel Wan's text encoder: a trained vector per word (text_dim wide,
                          drawn at unit scale, pads zero), trained and saved with the whole
                          model (--lora_rank=0), frozen beside an adapter
Guidance's unconditional half is the states of '', as WanPipeline.encode_prompt encodes a missing
negative prompt: the file's '' entry (a file without one is refused when the policy is built), the
function called on [''], or an empty caption, all pads. States are zero-padded to text_len, which a
folder source requires to be 512, Wan's max_sequence_length.
"""
import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from cli import ConfigError, UserError


class PromptStates(nn.Module):
    """The text encoder's states (B, text_len, D) for postflow's token ids, from cfg.text."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.len, self.fn, self.index, self.words = cfg.text_len, None, None, None
        if cfg.text == "learned":  # a text encoder learned from scratch: a trained vector per word
            self.words = nn.Embedding(len(data.VOCAB), dim, padding_idx=0)
            with torch.no_grad():   # unit scale, as the DiT's words, from the seed; pads stay zero
                self.words.weight.normal_(generator=torch.Generator().manual_seed(cfg.seed + 1))
                self.words.weight[0] = 0
            table = None
            empty = torch.zeros(cfg.text_len, dim)   # '' is all pads, as for 'tokens'
        elif cfg.text == "tokens":   # a frozen stand-in for a text encoder: a fixed vector per word
            table = torch.randn(len(data.VOCAB), dim,
                                generator=torch.Generator().manual_seed(cfg.seed + 1))
            empty = torch.zeros(cfg.text_len, dim)   # '' has no words: all pads
        elif cfg.text.endswith(".safetensors"):
            from safetensors.torch import load_file
            if not os.path.isfile(cfg.text):
                raise ConfigError(f"prompt states file not found: {cfg.text} "
                                  f"(write one with python adapters.py embed)")
            states = load_file(cfg.text)
            bad = [p for p, s in states.items()
                   if s.dim() != 2 or s.shape[1] != dim or len(s) > cfg.text_len]
            if bad:
                raise ConfigError(f"{cfg.text}: the states of {bad[0]!r} are "
                                  f"{tuple(states[bad[0]].shape)}; this transformer "
                                  f"takes (L <= text_len={cfg.text_len}, {dim})")
            pad = lambda s: F.pad(s.float(), (0, 0, 0, cfg.text_len - len(s)))
            if "" not in states:   # refused at build, not at the first guided step of a run
                raise ConfigError(f"{cfg.text} has no states for '', guidance's unconditional "
                                  f"prompt (Wan's pipeline encodes ''); rerun adapters.py embed")
            empty = pad(states.pop(""))
            self.index = {p: i for i, p in enumerate(states)}
            table = torch.stack([pad(s) for s in states.values()]) if states else empty[None]
        else:
            module, _, name = cfg.text.partition(":")
            try:
                self.fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                raise ConfigError(f"--text={cfg.text} is not 'tokens', 'learned', a .safetensors "
                                  f"file or an importable 'module:function'") from None
            with torch.no_grad():
                empty = self.fn([""])[0].float()
            if empty.dim() != 2 or empty.shape[1] != dim or len(empty) > cfg.text_len:
                raise ConfigError(f"--text={cfg.text} gives '' states of {tuple(empty.shape)}; "
                                  f"this transformer takes (L <= text_len={cfg.text_len}, {dim})")
            empty = F.pad(empty, (0, 0, 0, cfg.text_len - len(empty)))
            table = empty[None]
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("empty", empty, persistent=False)

    def forward(self, tokens, drop=None):
        if self.words is not None:
            states = self.words(tokens)                              # (B, L, D), pads are zero
        elif self.fn is None and self.index is None:
            states = self.table[tokens] * (tokens != 0)[..., None]   # (B, L, D), pads are zero
        else:
            prompts = [" ".join(data.VOCAB[i] for i in row if i) for row in tokens.tolist()]
            if self.fn is not None:
                states = self.fn(prompts).to(self.empty)
            else:
                missing = [p for p in prompts if p not in self.index]
                if missing:
                    raise UserError(f"the prompt states file has no entry for {missing[0]!r}; "
                                    f"rerun adapters.py embed")
                rows = torch.tensor([self.index[p] for p in prompts], device=tokens.device)
                states = self.table[rows]
        states = F.pad(states, (0, 0, 0, self.len - states.shape[1]))   # (B, text_len, D)
        return states if drop is None else torch.where(drop[:, None, None], self.empty, states)
