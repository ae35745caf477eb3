"""Share a model checkpoint: the original page's last example, with ``array`` for torch.

A training work saves two checkpoints into ``lit://outputs/checkpoints``; a deploy work
receives the folder when its ``run`` starts and loads them.

    pathapi run examples/model_checkpoint.py
"""

import os
from array import array

from pathapi import App, Flow, Work


def save(weights, path):
    with open(path, "wb") as f:
        weights.tofile(f)


def load(path):
    weights = array("f")
    with open(path, "rb") as f:
        weights.frombytes(f.read())
    return weights


class ModelTraining(Work):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = "lit://outputs/checkpoints"

    def run(self):
        # create a directory
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        # make fake checkpoints
        checkpoint_1 = array("f", [0, 1, 2, 3, 4])
        checkpoint_2 = array("f", [5, 6, 7, 8, 9])
        save(checkpoint_1, os.path.join(self.checkpoint_dir, "checkpoint_1.ckpt"))
        save(checkpoint_2, os.path.join(self.checkpoint_dir, "checkpoint_2.ckpt"))


class ModelDeploy(Work):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.loaded = {}

    def run(self, checkpoint_dir):
        ckpts = sorted(os.listdir(checkpoint_dir))
        checkpoint_1 = load(os.path.join(checkpoint_dir, ckpts[0]))
        checkpoint_2 = load(os.path.join(checkpoint_dir, ckpts[1]))
        self.loaded = {ckpts[0]: checkpoint_1.tolist(), ckpts[1]: checkpoint_2.tolist()}


class CheckpointFlow(Flow):
    def __init__(self):
        super().__init__()
        self.train = ModelTraining()

        # pass the checkpoint path
        self.deploy = ModelDeploy()

    def run(self):
        self.train.run()
        self.deploy.run(checkpoint_dir=self.train.checkpoint_dir)
        print(f"deploy loaded {self.deploy.loaded}")


app = App(CheckpointFlow())
