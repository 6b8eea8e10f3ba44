"""NIR graph structure for ``snnc/nir.py``: nested graphs inlined, recurrent cycles folded into
one neuron with a feedback path, and a topological order of what is left.

NIR allows cycles (a recurrent connection carries the previous step's output); snnc's per-step
graph is acyclic, with the recurrence as the state of an ``snn.feedback`` op. The strongly
connected components are found with Tarjan's algorithm (SIAM J. Comput. 1972), iteratively.
"""
from __future__ import annotations

from .errors import FileFormatError, UnsupportedOp


def sccs(nodes, succ) -> list[list[str]]:
    """Strongly connected components (Tarjan), iterative so deep graphs do not hit recursion limits."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def inline_subgraphs(g, nir):
    """A node that is itself a ``NIRGraph`` (older snntorch / nirtorch write RLeaky / RSynaptic
    that way) is replaced by its nodes, named ``outer.inner``; edges into it go to the targets of
    its Input node(s), edges out of it come from the sources of its Output node(s)."""
    if not any(isinstance(n, nir.NIRGraph) for n in g.nodes.values()):
        return g
    nodes, edges, ins, outs = {}, [], {}, {}
    for k, n in g.nodes.items():
        if not isinstance(n, nir.NIRGraph):
            nodes[k] = n
            continue
        sub = inline_subgraphs(n, nir)
        inner = {f"{k}.{j}": m for j, m in sub.nodes.items() if not isinstance(m, (nir.Input, nir.Output))}
        nodes.update(inner)
        ins[k] = [f"{k}.{d}" for s, d in sub.edges if isinstance(sub.nodes[s], nir.Input)]
        outs[k] = [f"{k}.{s}" for s, d in sub.edges if isinstance(sub.nodes[d], nir.Output)]
        edges += [(f"{k}.{s}", f"{k}.{d}") for s, d in sub.edges
                  if not isinstance(sub.nodes[s], nir.Input) and not isinstance(sub.nodes[d], nir.Output)]
    for s, d in g.edges:
        edges += [(a, b) for a in outs.get(s, [s]) for b in ins.get(d, [d])]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(getattr(g, "metadata", None) or {}))


def fold_cycles(g, stateful):
    """NIR's recurrent edges: each cycle must pass through exactly one neuron ``n`` and otherwise
    be a chain of stateless nodes ``n -> w1 -> ... -> n`` (the NIR paper's Braille graphs:
    ``lif -> w_rec -> lif``). Returns ``(edges without the cycles, {n: [w1, ...]})``; the neuron
    becomes ``Feedback(neuron, w1 ... wk)`` (``snnc/ops/feedback.py``)."""
    succ = {k: set() for k in g.nodes}
    for src, dst in g.edges:
        for end in (src, dst):
            if end not in g.nodes:
                raise FileFormatError(f"NIR edge ({src!r}, {dst!r}) names unknown node {end!r}")
        succ[src].add(dst)
    edges, loops = list(g.edges), {}
    for comp in sccs(g.nodes, succ):
        if len(comp) == 1 and comp[0] not in succ[comp[0]]:
            continue
        members = set(comp)
        neurons = sorted(k for k in comp if stateful(g.nodes[k]))
        where = "NIR graph has a recurrent connection (cycle through " + ", ".join(sorted(comp)) + ")"
        if len(neurons) != 1:
            raise UnsupportedOp(f"{where} with {len(neurons)} neurons in it; snnc imports cycles that pass through "
                                "exactly one neuron (neuron -> weights -> neuron)")
        n, chain, k = neurons[0], [], neurons[0]
        while True:
            nxt = [d for d in succ[k] if d in members]
            if len(nxt) != 1:
                raise UnsupportedOp(f"{where}: node '{k}' has {len(nxt)} successors inside the cycle; snnc imports "
                                    "one chain neuron -> weights -> neuron")
            k = nxt[0]
            if k == n:
                break
            chain.append(k)
        for w in chain:
            outside = [e for e in g.edges if (e[1] == w and e[0] not in members) or (e[0] == w and e[1] not in members)]
            if outside:
                raise UnsupportedOp(f"{where}: the recurrent node '{w}' also connects outside the cycle ({outside[0]})")
        loops[n] = chain
        edges = [e for e in edges if not (e[0] in members and e[1] in members)]
    return edges, loops


def toposort(nodes, edges) -> list[str]:
    preds = {k: [] for k in nodes}
    for src, dst in edges:
        preds[dst].append(src)
    order, done = [], set()

    def visit(k):
        stack = [(k, iter(preds[k]))]
        while stack:
            v, it = stack[-1]
            p = next(it, None)
            if p is None:
                stack.pop()
                if v not in done:
                    done.add(v)
                    order.append(v)
            elif p not in done:
                stack.append((p, iter(preds[p])))

    for k in sorted(nodes):
        if k not in done:
            visit(k)
    return order, preds
