"""Semi-supervised cross-teaching between the planned nnU-Net CNN and a second network (CS-Unet by default):
CTS (Luo et al.), MCSC and MCSCv2 (Liu thesis ch. 4-5; spec shared/specs/001-liu-thesis.md §4, §5, §7).
See README.md next to this file."""
