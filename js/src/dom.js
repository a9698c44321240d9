// DOM helpers shared by the widget's panels: elements, select options, labelled rows, ids.
// (models.js and pattern.js get `h`, `row` and `newId` passed in by widget.js.)

let counter = 0;
/** A fresh message id, unique within the page. */
export const newId = () => `js-${Date.now().toString(36)}-${++counter}`;

/** `document.createElement(tag)` with properties / attributes `attrs` and `children`. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

/** Replace the options of `select` with `items` ([value, label] pairs); select `value`. */
export function options(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => h("option", { value: v }, label)));
  if (value !== undefined) select.value = value;
}

/** A labelled row of the control panels. */
export function row(label, ...inputs) {
  return h("label", { class: "lw-row" }, h("span", { class: "lw-label" }, label), ...inputs);
}
