"""Remove Identity and inference-time Dropout nodes."""

from __future__ import annotations

from onnx import GraphProto, ModelProto

REMOVABLE = {"Identity", "Dropout"}


def _rename_input(graph: GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


class RemoveIdentity:
    """``x → Identity → y → C`` becomes ``x → C``; same for Dropout whose mask is unused.

    When ``y`` is a graph output the producer of ``x`` is renamed to write ``y`` instead, unless
    ``x`` is itself a graph input/output or weight (then the node stays).
    """

    name = "remove-identity"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        outputs = {o.name for o in graph.output}
        fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer} | outputs
        changed = False
        for node in list(graph.node):
            if node.op_type not in REMOVABLE or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
                continue
            src, dst = node.input[0], node.output[0]
            if dst in outputs:
                if src in fixed:
                    continue
                _rename_input(graph, src, dst)
                for other in graph.node:
                    for k, name in enumerate(other.output):
                        if name == src:
                            other.output[k] = dst
            else:
                _rename_input(graph, dst, src)
            graph.node.remove(node)
            changed = True
        return changed
