//! Multidimensional plans. (Placeholder.)
