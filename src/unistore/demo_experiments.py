"""The experiments part of ``make demo``: a lab's results offloaded as they complete, then searched."""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any


def run_experiments_demo(workdir: str, epochs: int = 5000) -> dict[str, Any]:
    """Run two hypotheses in the reference lab with results offloaded; print searches and a history read."""
    from unistore.experiments import ChromaConfig, LabConfig, TimeSeriesConfig, create_memory_efficient_nal

    root = os.path.join(workdir, "experiments")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    lab, integration = create_memory_efficient_nal(
        LabConfig(epochs=epochs), ChromaConfig(persist_directory=os.path.join(root, "chroma")),
        TimeSeriesConfig(storage_dir=os.path.join(root, "timeseries"), use_hdf5=True, compression="gzip"),
        catalog_url=os.path.join(root, "catalog.db"))
    widths = [(784, w, 10) for w in (16, 64, 256, 1024)]
    depths = [(784,) + (128,) * d + (10,) for d in (1, 2, 3, 4)]
    asyncio.run(lab.test_hypothesis("width", widths))
    asyncio.run(lab.test_hypothesis("depth", depths, dataset="cifar10"))
    searcher = integration.searcher
    print(f"\nExperiments: {integration.offloaded} results offloaded as they completed "
          f"({len(lab.results)} left in the lab's memory), {searcher.count()} indexed in {searcher.config.where}")
    print("nearest to [784, 200, 10]:", ", ".join(
        f"{r['experiment_id']} {r['experiment_data']['architecture']}"
        for r in searcher.search_by_architecture([784, 200, 10], n_results=3)))
    best = searcher.search_by_performance(min_accuracy=0.5, dataset="mnist")
    print("mnist, accuracy >= 0.5:", ", ".join(f"{r['experiment_id']} ({r['metadata']['accuracy']:.3f})"
                                              for r in best))
    top = best[0]["experiment_id"] if best else "width-3"
    storage = integration.storage
    storage.timeseries.reset_io_stats()
    record = storage.retrieve_experiment(top, include_training_history=True, epochs=slice(-3, None))
    print(f"last 3 of {epochs} epochs of {top}: " + ", ".join(f"{r['epoch']}: loss {r['loss']:.4f}"
                                                            for r in record["training_history"])
          + f" (from the time series: {storage.timeseries.io_stats()['bytes']:,} bytes read of "
            f"{record['training_summary']['n_epochs'] * 3 * 8:,})")
    storage.close()
    return {"offloaded": integration.offloaded, "best": [r["experiment_id"] for r in best]}
