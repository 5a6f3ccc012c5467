"""The bundled `cpu` fleet: four workers that analyse what a deception network observed."""
