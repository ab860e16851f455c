#!/usr/bin/env python
"""How fast the Shapes judge reads images (CPU time for 500 rendered scenes)."""
import json
import random
import time

from lverse.shapes.judge import read_image, read_images
from lverse.shapes.scenes import render, sample_scene

rng = random.Random(6)
images = [render(sample_scene(rng, max_objects=2)) for _ in range(500)]
read_image(images[0])  # shape prototypes are measured once, on first use
start = time.process_time()
read_images(images)
cpu = time.process_time() - start
print(json.dumps({"images": 500, "cpu_seconds": round(cpu, 3), "ms_per_image": round(1000 * cpu / 500, 3)}))
