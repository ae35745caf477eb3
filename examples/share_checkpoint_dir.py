"""Tell pathapi where your files are, and hand them to another work.

The original page's first two examples: a source work shares ``outputs/checkpoints`` by
writing ``lit://`` in front of it; the flow passes that Path to a destination work, which
finds the files in its own filesystem when its ``run`` starts.

    pathapi run examples/share_checkpoint_dir.py
"""

import os

from pathapi import App, Flow, Work


class SourceWork(Work):
    def __init__(self):
        super().__init__()
        self.checkpoint_dir = None

    def run(self):
        # Normally you would do:  self.checkpoint_dir = "outputs/checkpoints"
        # To share the folder, do:
        self.checkpoint_dir = "lit://outputs/checkpoints"
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        for i in (1, 2):
            with open(os.path.join(self.checkpoint_dir, f"checkpoint_{i}.ckpt"), "wb") as f:
                f.write(bytes([i]) * 10_000)


class DestinationWork(Work):
    def __init__(self):
        super().__init__()
        self.files = []

    def run(self, checkpoint_dir):
        # The directory is now accessible inside this work
        self.files = sorted(os.listdir(checkpoint_dir))


class ShareFlow(Flow):
    def __init__(self):
        super().__init__()
        self.source = SourceWork()
        self.destination = DestinationWork()

    def run(self):
        self.source.run()
        # Pass the Path reference from one work to another
        self.destination.run(self.source.checkpoint_dir)
        print(f"{self.destination.name} received {self.destination.files} "
              f"from {self.source.checkpoint_dir.origin_name}")


app = App(ShareFlow())
