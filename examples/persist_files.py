"""Persist files: the Paths in a work's state outlive the work; plain strings do not.

After every ``run`` the trainer's ``lit://`` Paths are stored in the app's artifact store.
The flow then stops the trainer, and a reader still fetches the checkpoints from the store.
The logs folder was a plain string, so it was not stored and cannot be fetched.

    pathapi run examples/persist_files.py
"""

import os

from pathapi import App, Flow, Path, Work


class Trainer(Work):
    def __init__(self):
        super().__init__()
        # The files in this path will be saved as an artifact when the work finishes
        self.checkpoint_dir = "lit://outputs/checkpoints"
        # The files in this path WON'T be saved because it is not declared with lit://
        self.log_dir = "outputs/logs"

    def run(self):
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.checkpoint_dir, "model.ckpt"), "wb") as f:
            f.write(b"\x00\x01" * 50_000)
        with open(os.path.join(self.log_dir, "train.log"), "w") as f:
            f.write("epoch 1 done\n")


class Reader(Work):
    def __init__(self):
        super().__init__()
        self.found = {}

    def run(self, checkpoint_dir, trainer_name):
        # checkpoint_dir was transferred from the artifact store when this run started
        self.found["checkpoints"] = sorted(os.listdir(checkpoint_dir))
        self.found["checkpoints_exist_remote"] = checkpoint_dir.exists_remote()
        logs = Path("lit://outputs/logs", origin=trainer_name)
        self.found["logs_exist_remote"] = logs.exists_remote()
        try:
            logs.get()
            self.found["logs"] = "fetched"
        except FileNotFoundError:
            self.found["logs"] = "not persisted"


class PersistFlow(Flow):
    def __init__(self):
        super().__init__()
        self.trainer = Trainer()
        self.reader = Reader()

    def run(self):
        self.trainer.run()
        self.trainer.stop()  # waits until its Paths are persisted, then ends its process
        self.reader.run(self.trainer.checkpoint_dir, self.trainer.name)
        print(" ".join(f"{k}={v}" for k, v in self.reader.found.items()))


app = App(PersistFlow())
