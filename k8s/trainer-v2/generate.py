"""Writes k8s/trainer-v2/runtime.yaml, the Kubeflow Trainer v2 ClusterTrainingRuntime of this image,
from the multi-node JobSet (k8s/overlays/multiworker-jobset): the same pods, exit-code policies and
shapes, in the form Trainer v2 builds JobSets from. Run it after changing that overlay:

  python k8s/trainer-v2/generate.py        (tests/test_k8s.py fails while the two disagree)

Trainer v2's conventions: the replicated job and the trainer container are both named `node`, the
replicated job carries the `trainjob-ancestor-step: trainer` label, and a TrainJob's numNodes sets
its parallelism and completions. Trainer v2 sets no environment for a runtime without a framework
policy, so the pods find their peers from the JobSet labels, as the JobSet overlay's do, and the
worker count from TRAINER_NUM_WORKERS, which the TrainJob sets to its numNodes.
"""

import copy
import os
import sys

import yaml

K8S = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, K8S)
import render  # noqa: E402 - k8s/render.py

RUNTIME_NAME = "image-transfer-tensorflow"
NODE = "node"  # Trainer v2's name for the trainer's replicated job and container


def runtime_from(jobset):
    """The ClusterTrainingRuntime of a rendered multi-worker JobSet."""
    spec = copy.deepcopy(jobset["spec"])
    spec.pop("ttlSecondsAfterFinished", None)  # the TrainJob's own lifecycle
    (replicated,) = spec["replicatedJobs"]
    replicated["name"] = NODE
    replicated["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] = "trainer"
    job = replicated["template"]["spec"]
    job["parallelism"] = job["completions"] = 1  # numNodes of the TrainJob replaces both
    for rule in job["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = NODE
    (container,) = job["template"]["spec"]["containers"]
    container["name"] = NODE
    # The worker count comes from TRAINER_NUM_WORKERS (the TrainJob's numNodes), the strategy from
    # the cluster it finds (one node: MirroredStrategy).
    container["args"] = [arg for arg in container["args"]
                         if not arg.startswith(("--num_workers=", "--strategy="))]
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": RUNTIME_NAME,
                         "labels": {"trainer.kubeflow.org/framework": "tensorflow",
                                    "app.kubernetes.io/name": "image-trainer"}},
            "spec": {"mlPolicy": {"numNodes": 1}, "template": {"spec": spec}}}


def rendered_runtime():
    (jobset,) = [item for item in render.kustomize(os.path.join(K8S, "overlays", "multiworker-jobset"))
                 if item["kind"] == "JobSet"]
    return runtime_from(jobset)


HEADER = """# Kubeflow Trainer v2's TensorFlow runtime for this image (kubeflow/trainer#2443): a
# ClusterTrainingRuntime whose JobSet is k8s/overlays/multiworker-jobset's. Written by
# k8s/trainer-v2/generate.py; do not edit by hand. Apply once per cluster (Trainer v2 >= v2.0):
#   kubectl apply --server-side -f k8s/trainer-v2/runtime.yaml
# then submit TrainJobs like k8s/trainer-v2/trainjob.yaml (docs/cluster.md#kubeflow-trainer-v2).
"""

if __name__ == "__main__":
    with open(os.path.join(K8S, "trainer-v2", "runtime.yaml"), "w") as handle:
        handle.write(HEADER + yaml.safe_dump(rendered_runtime(), sort_keys=False, default_flow_style=False))
