"""DICOM networking from the worker side: the DIMSE SCU to a PACS (`pacs`: C-ECHO, C-STORE, C-FIND, C-MOVE,
C-GET) and DICOMweb (`dicomweb`: STOW-RS, QIDO-RS, WADO-RS, over `multipart`)."""
