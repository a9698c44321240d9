// The plotly.js partial bundle: the core plus the traces the widget draws.
// Surface brings gl3d (the largest part); everything else is SVG. Carpet and contourcarpet
// draw the plane through three models on its triangle (triangle.js).
import Plotly from "plotly.js/lib/core";
import carpet from "plotly.js/lib/carpet";
import contour from "plotly.js/lib/contour";
import contourcarpet from "plotly.js/lib/contourcarpet";
import heatmap from "plotly.js/lib/heatmap";
import scatter from "plotly.js/lib/scatter";
import surface from "plotly.js/lib/surface";

Plotly.register([heatmap, contour, surface, scatter, carpet, contourcarpet]);

export default Plotly;
