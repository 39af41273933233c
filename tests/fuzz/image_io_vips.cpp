// src/data/image_io.cpp compiled with libvips for the fuzz targets that decode images
// (fuzz_image, fuzz_jsonl): the top-level build sets FLUXTRAIN_WITH_VIPS on that file in its own
// directory only, and fuzz_dataset keeps the plain build of it.
#define FLUXTRAIN_WITH_VIPS 1
#include "src/data/image_io.cpp"
