"""The domain predictor learns a planted token -> expert-domain mapping and scores held-out prompts right."""
import numpy as np

from expertmesh.placement.coactivation import split_requests
from expertmesh.placement.plan import Placement
from expertmesh.placement.predictor import DomainPredictor, accuracy
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import RoutingTrace


def planted_trace(seed, docs=20, length=64):
    """Documents of kind 0 use tokens 0..49 and experts {0,1}; kind 1 tokens 50..99 and experts {2,3};
    10% of every document's tokens are shared tokens 100..109 routed at random."""
    rng = np.random.default_rng(seed)
    token_ids, doc_index, ids = [], [], []
    for doc in range(docs):
        kind = doc % 2
        for _ in range(length):
            if rng.random() < 0.1:
                token_ids.append(100 + rng.integers(10))
                ids.append([rng.permutation(4)[:2]])
            else:
                token_ids.append(kind * 50 + rng.integers(50))
                ids.append([[2 * kind, 2 * kind + 1]])
            doc_index.append(doc)
    ids = np.array(ids, np.int16)
    unlabelled = np.full(len(token_ids), -1, np.int16)
    return RoutingTrace(np.array(token_ids, np.int32), np.array(doc_index, np.int32), unlabelled,
                        ids, np.full(ids.shape, 0.5, np.float16), np.array([0], np.int32),
                        [str(d) for d in range(docs)], [], 4)


def test_learns_a_planted_mapping(tmp_path):
    topology = Topology.uniform(2, 2, 2)
    placement = Placement(2, {0: [[0], [0], [1], [1]]})  # experts 0,1 in domain 0; 2,3 in domain 1
    predictor = DomainPredictor.fit(planted_trace(0), placement, topology)
    assert predictor.predict([3, 7, 12])[0] == 0 and predictor.predict([60, 99, 105])[0] == 1
    shared = predictor.scores([100, 101])
    assert abs(shared[0] - shared[1]) < 1.0  # random-routed tokens carry little evidence
    held_out = planted_trace(1)
    assert accuracy(predictor, held_out, placement, topology, split_requests(held_out, 32), 16) == 1.0
    predictor.save(str(tmp_path / "p.npz"))
    assert DomainPredictor.load(str(tmp_path / "p.npz")).predict([60, 61])[0] == 1
    assert predictor.predict([10_000])[0] == 0  # unseen ids score uniformly, no crash
