"""The input pipelines of each task: ImageNet folders (data, dali, imagefiles), the demo sets
(demo_data), CIFAR's on-device loader (cifar) and COCO (coco)."""
