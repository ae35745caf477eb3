"""The original API's Drive example: the flow makes a Drive and hands it to two works.

``Work1`` puts ``a.txt`` into the Drive and removes its own copy; ``Work2`` lists the Drive,
finds ``a.txt`` put by ``root.work_1``, and gets it into its own root. The Drive lives in the
app's artifact store, so ``a.txt`` is still there for the next app run on the same root.

    pathapi run examples/drive.py
"""

import os

from pathapi import App, Drive, Flow, Work


class Work1(Work):
    def run(self, drive):
        with open("a.txt", "w") as f:
            f.write("Hello World !")
        drive.put("a.txt")
        os.remove("a.txt")


class Work2(Work):
    def run(self, drive):
        print(drive.list("."))  # ['a.txt']
        print(os.path.exists("a.txt"))  # False
        drive.get("a.txt")
        print(os.path.exists("a.txt"))  # True
        with open("a.txt") as f:
            print(f.read())  # Hello World !


class Root(Flow):
    def __init__(self):
        super().__init__()
        self.drive_1 = Drive("lit://drive_1")
        self.work_1 = Work1()
        self.work_2 = Work2()

    def run(self):
        self.work_1.run(self.drive_1)
        self.work_2.run(self.drive_1)


app = App(Root())
