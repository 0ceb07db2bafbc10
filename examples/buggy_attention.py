"""A learner's attention file with three bugs that are easy to write and hard to see. It runs, it
returns the right shapes, and it fails the suite with messages that say what is wrong:

    pytest -n auto --impl examples/buggy_attention.py

1. MultiHeadAttention reads the mask with nn.MultiheadAttention's polarity (True = masked out), while the
   spec's masks say True = may attend.
2. Its causal mask is built with ``triu(..., diagonal=0)``: every position also hides itself, so the first
   position sees nothing at all.
3. GroupedQueryAttention expands the KV heads round-robin (query head i reads KV head i % n_kv_head).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None, causal=False):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))  # bug 1: True means "keep" in the spec
        if causal:
            future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=0)  # bug 2
            scores = scores.masked_fill(future, -1e9)
        weights = F.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, s, d)
        return self.o(out)


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__()
        self.h, self.g, self.e = n_head, n_kv_head, d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, n_kv_head * self.e)
        self.v = nn.Linear(d_model, n_kv_head * self.e)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None, causal=False):
        b, s, d = x.shape
        r = self.h // self.g
        q = self.q(x).view(b, s, self.h, self.e).transpose(1, 2)
        # bug 3: (b, s, 1, g, e) expanded to (b, s, r, g, e) tiles the KV heads: head i reads i % g
        k = self.k(x).view(b, s, 1, self.g, self.e).expand(b, s, r, self.g, self.e).reshape(b, s, self.h, self.e)
        v = self.v(x).view(b, s, 1, self.g, self.e).expand(b, s, r, self.g, self.e).reshape(b, s, self.h, self.e)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.e)
        if causal:
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.nan_to_num(F.softmax(scores, dim=-1))
        return self.o((weights @ v).transpose(1, 2).reshape(b, s, d))
