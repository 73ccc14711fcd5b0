"""Remove Identity and inference-time Dropout nodes."""

from __future__ import annotations

from onnx import GraphProto, ModelProto

from edgequant.ir.graph import direct_bodies

REMOVABLE = {"Identity", "Dropout"}


class Aliases:
    """Names that stand for others after a rewrite: ``resolve`` follows the chain to the name
    that remains (``y → x`` when ``y = Identity(x)`` goes)."""

    def __init__(self) -> None:
        self.to: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.to)

    def add(self, old: str, new: str) -> None:
        self.to[old] = new

    def resolve(self, name: str) -> str:
        seen = name
        while seen in self.to:
            seen = self.to[seen]
        return seen


def _local_names(g: GraphProto) -> set[str]:
    return ({i.name for i in g.input} | {t.name for t in g.initializer}
            | {o for n in g.node for o in n.output if o})


def rename_everywhere(graph: GraphProto, aliases: Aliases) -> None:
    """Rewrite every node input and output of ``graph`` through ``aliases``, and the inputs of
    nodes in its ``If``/``Loop``/``Scan`` bodies that capture a renamed outer value (a name a
    body defines itself is that body's own, and is left alone inside it)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in aliases.to:
                node.input[i] = aliases.resolve(name)
        for i, name in enumerate(node.output):
            if name in aliases.to:
                node.output[i] = aliases.resolve(name)
        stack = [(g, _local_names(g)) for g in direct_bodies(node)]
        while stack:
            body, shadowed = stack.pop()
            for inner in body.node:
                for i, name in enumerate(inner.input):
                    if name in aliases.to and name not in shadowed:
                        inner.input[i] = aliases.resolve(name)
                stack += [(g, shadowed | _local_names(g)) for g in direct_bodies(inner)]


class RemoveIdentity:
    """``x → Identity → y → C`` becomes ``x → C``; same for Dropout whose mask is unused.

    Uses of ``y`` are renamed everywhere, captures inside ``If``/``Loop``/``Scan`` bodies
    included. When ``y`` is a graph output the producer of ``x`` is renamed to write ``y``
    instead, unless ``x`` is itself a graph input/output or weight (then the node stays).
    Identities inside bodies stay (a body output may be an outer value passed through).
    Linear: one pass to decide, one to rename.
    """

    name = "remove-identity"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        outputs = {o.name for o in graph.output}
        fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer} | outputs
        aliases = Aliases()
        keep = []
        for node in graph.node:
            if not self._removable(node):
                keep.append(node)
                continue
            src, dst = aliases.resolve(node.input[0]), node.output[0]
            if dst in outputs:
                if src in fixed:
                    keep.append(node)
                    continue
                aliases.add(src, dst)  # the producer of src writes the output itself
                fixed.add(dst)
            else:
                aliases.add(dst, src)
        if len(keep) == len(graph.node):
            return False
        graph.ClearField("node")
        graph.node.extend(keep)
        rename_everywhere(graph, aliases)
        return True

    @staticmethod
    def _removable(node) -> bool:
        if node.op_type not in REMOVABLE or node.domain not in ("", "ai.onnx"):
            return False
        return not (node.op_type == "Dropout" and len(node.output) > 1 and node.output[1])
