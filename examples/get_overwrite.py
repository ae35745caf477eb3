"""Get files manually: ``get()``, and ``get(overwrite=True)`` once they exist locally.

A trainer adds a checkpoint per epoch. An evaluator holds a reference to the trainer's folder
(set by the flow as an attribute, so nothing is transferred automatically) and fetches it with
``get()`` each time it runs. The first ``get`` brings everything; later ones raise
``FileExistsError`` unless ``overwrite=True``, and move only the chunks the evaluator lacks.

    pathapi run examples/get_overwrite.py
"""

import os
import random

from pathapi import App, Flow, Work


class Trainer(Work):
    def __init__(self):
        super().__init__()
        self.checkpoint_dir = "lit://outputs/checkpoints"
        self.epoch = 0

    def run(self):
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.epoch += 1
        weights = random.Random(self.epoch).randbytes(1 << 20)
        with open(os.path.join(self.checkpoint_dir, f"epoch_{self.epoch}.ckpt"), "wb") as f:
            f.write(weights)


class Evaluator(Work):
    def __init__(self):
        super().__init__()
        self.checkpoint_dir = None  # a reference to the trainer's folder, set by the flow
        self.report = []

    def run(self):
        try:
            self.checkpoint_dir.get()
            how = "get()"
        except FileExistsError:
            # The path already exists locally: force overwriting it
            self.checkpoint_dir.get(overwrite=True)
            how = "get(overwrite=True)"
        t = self.checkpoint_dir.last_transfer
        self.report.append({
            "how": how,
            "files": sorted(os.listdir(self.checkpoint_dir)),
            "chunks_transferred": t.chunks_transferred,
            "chunks_reused": t.chunks_reused,
        })


class GetFlow(Flow):
    def __init__(self):
        super().__init__()
        self.trainer = Trainer()
        self.evaluator = Evaluator()

    def run(self):
        self.evaluator.checkpoint_dir = self.trainer.checkpoint_dir
        for _ in range(3):
            self.trainer.run()
            self.evaluator.run()
        for r in self.evaluator.report:
            print(f"{r['how']:20s} {r['files']}: moved {r['chunks_transferred']} chunks, reused {r['chunks_reused']}")


app = App(GetFlow())
