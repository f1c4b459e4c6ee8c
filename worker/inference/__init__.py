"""Series in, frames out: the method (`pipeline`, `modelsr`), the engines that run the networks (`engines/`),
the derived DICOM series (`derived`), and the export of the networks to ONNX graphs (`graphs`)."""
