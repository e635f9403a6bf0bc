"""Layer types that strategies inject into a backbone."""
