//! The VHDX virtual disk format (MS-VHDX).
