# A minimal stand-in for nixpkgs' lib, enough to evaluate the modules'
# option declarations and service definitions offline. Options evaluate
# to their declaration (with _type = "option"); mkIf keeps its content.
rec {
  mkOption = decl: decl // { _type = "option"; };
  mkEnableOption = name: mkOption { default = false; description = "Whether to enable ${name}."; type = "bool"; };
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  types = {
    str = "str";
    bool = "bool";
    package = "package";
    nullOr = t: "null or ${t}";
    listOf = t: "list of ${t}";
  };
  mkIf = cond: content: { _type = "if"; condition = cond; inherit content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
  last = l: builtins.elemAt l (builtins.length l - 1);
  toInt = s: builtins.fromJSON s;
  concatStringsSep = builtins.concatStringsSep;
  escapeShellArg = a: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] a + "'";
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
}
