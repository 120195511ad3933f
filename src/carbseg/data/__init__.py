"""Datasets, class sets, image-level labels, joint transforms and global/local views."""
