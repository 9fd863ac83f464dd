"""Datasets: the synthetic shapes world (`blip.data.shapes`), and the one reader of dataset files used by training,
the batch jobs and CapFilt: manifests and Karpathy/COCO/VQA json (`blip.data.manifests`), WebDataset tar shards
(`blip.data.webdataset`)."""
