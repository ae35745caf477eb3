"""Check whether a file or folder exists: ``exists_remote()`` and ``exists_local()``.

A parallel producer publishes a results folder after a while (written aside, then renamed
into place, so it appears whole). The consumer gets the Path when nothing exists at the
origin yet, so nothing is transferred when its ``run`` starts; it polls ``exists_remote()``
and fetches the folder once it is there.

    pathapi run examples/exists_checks.py
"""

import os
import time

from pathapi import App, Flow, Work


class Producer(Work):
    def __init__(self):
        super().__init__(parallel=True)
        self.results = "lit://outputs/results"

    def run(self):
        time.sleep(1.0)  # some work before the results exist
        os.makedirs("tmp/results", exist_ok=True)
        with open("tmp/results/metrics.txt", "w") as f:
            f.write("accuracy 0.93\n")
        os.makedirs(os.path.dirname(self.results), exist_ok=True)
        os.replace("tmp/results", self.results)  # publish the folder whole


class Consumer(Work):
    def __init__(self):
        super().__init__()
        self.checks = {}

    def run(self, results):
        self.checks["local_at_start"] = results.exists_local()
        self.checks["remote_at_start"] = results.exists_remote()
        while not results.exists_remote():
            time.sleep(0.05)
        # Get the folder only once it exists in the source work
        results.get(overwrite=results.exists_local())
        self.checks["local_after_get"] = results.exists_local()
        with open(os.path.join(results, "metrics.txt")) as f:
            self.checks["metrics"] = f.read().strip()


class ExistsFlow(Flow):
    def __init__(self):
        super().__init__()
        self.producer = Producer()
        self.consumer = Consumer()

    def run(self):
        self.producer.run()  # returns at once: the producer is a parallel work
        self.consumer.run(self.producer.results)
        self.producer.wait()
        print(" ".join(f"{k}={v}" for k, v in self.consumer.checks.items()))


app = App(ExistsFlow())
