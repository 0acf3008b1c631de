"""Simulator of filled/empty-state STM topographs of H-Si(100)-2x1 with exact ground truth.

Conventions (used everywhere in this project):
- image axes: row = y, column = x; pixel (0, 0) has its centre at (x_px, y_px) = (0, 0);
- nanometre positions in the image frame are x_nm = x_px * pixel_size_nm, y_nm = y_px * pixel_size_nm;
- angles are in degrees in the image frame (x right, y down), modulo 180;
- a terrace's dimer rows run along the unit vector u = (cos a, sin a); with n = (-sin a, cos a) the row centre
  lines are the points p (nm, image frame) with  p . n == row_phase_nm  (mod 0.768 nm);
- heights are apparent heights in nanometres.
"""

from simulator.truth import DefectTruth, GroundTruth, TerraceTruth

__all__ = ["DefectTruth", "GroundTruth", "TerraceTruth"]
