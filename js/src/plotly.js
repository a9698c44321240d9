// The plotly.js partial bundle: the core plus the four traces the widget draws.
// Surface brings gl3d (the largest part); everything else is SVG.
import Plotly from "plotly.js/lib/core";
import contour from "plotly.js/lib/contour";
import heatmap from "plotly.js/lib/heatmap";
import scatter from "plotly.js/lib/scatter";
import surface from "plotly.js/lib/surface";

Plotly.register([heatmap, contour, surface, scatter]);

export default Plotly;
