"""The consume → handle → produce → commit loop every RadStream stage runs on."""
