"""Co-activation counts on a trace small enough to count by hand."""
import numpy as np

from expertmesh.placement.coactivation import coactivation, request_usage, split_requests
from expertmesh.placement.trace import RoutingTrace


def tiny_trace():
    # 4 tokens, 2 layers, top-2, 4 experts; tokens 0-2 in document 0 (domain 0), token 3 in document 1 (domain 1)
    ids = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 0]], [[1, 2], [3, 0]], [[0, 3], [2, 3]]], np.int16)
    labels = np.array([0, 0, 0, 1])
    return RoutingTrace(np.arange(4, dtype=np.int32), labels.astype(np.int32), labels.astype(np.int16),
                        ids, np.full(ids.shape, 0.5, np.float16), np.array([1, 3], np.int32), ["a", "b"], ["x", "y"], 4)


def test_counts_by_hand():
    trace = tiny_trace()
    stats = coactivation(trace)
    assert stats.token_pairs[0, 0, 1] == stats.token_pairs[0, 1, 0] == 2 and stats.token_pairs[0, 1, 2] == 1
    assert stats.load.tolist() == [[3, 3, 1, 1], [2, 0, 3, 3]] and np.all(np.diag(stats.token_pairs[1]) == [2, 0, 3, 3])
    # layer 0 -> 1: token 0 gives (0,2) (0,3) (1,2) (1,3); token 1 (0,2) (0,0) (1,2) (1,0); ...
    assert stats.next_layer[0, 0, 2] == 3 and stats.next_layer[0, 1, 0] == 2 and stats.next_layer[0, 3, 3] == 1
    assert stats.domain_load[1, 0].tolist() == [1, 0, 0, 1] and stats.moe_layers == [1, 3]


def test_requests_never_span_documents():
    trace = tiny_trace()
    spans = split_requests(trace, 2)
    assert spans.tolist() == [[0, 2], [2, 3], [3, 4]]
    assert split_requests(trace, 2, min_tokens=2).tolist() == [[0, 2]]
    usage = request_usage(trace, spans)
    assert usage[0, 1].tolist() == [1, 0, 2, 1] and usage.sum() == 4 * 2 * 2
