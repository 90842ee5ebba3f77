"""``python -m glimpse.train.verl``: print the folder of the plugin's files, for verl configs."""

from pathlib import Path

if __name__ == "__main__":
    print(Path(__file__).resolve().parent)
