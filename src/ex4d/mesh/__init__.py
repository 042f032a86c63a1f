"""ex4d.mesh: depth -> DW-Mesh (depth watertight mesh) and its PLY export."""

from ex4d.mesh.dwmesh import CAP_MODES, FILTERS, DWMesh, build_dw_mesh, export_ply, grid_faces

__all__ = ["CAP_MODES", "FILTERS", "DWMesh", "build_dw_mesh", "export_ply", "grid_faces"]
